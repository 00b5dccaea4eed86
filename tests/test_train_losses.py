"""The face-ID loss of IDAdapter (train/losses.py, DESIGN.md §2.5): x̂0 from the model output, the
differentiable ArcFace alignment against cv2 / insightface, gradient flow through a tiny VAE, the detector gate."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import shared_assets_or_skip
from train.tiny_face_models import ARCFACE_TEMPLATE, LANDMARKS_IN_STRIDES, square_faces_image, write_model_pack
from idadapter_core.errors import IDAdapterError
from idadapter_core.face import arcface_matrix, detect_face, load_face_analyzer, load_image, to_rgb_uint8
from train.losses import (
    FaceDetections, FaceDetectorGate, FaceIDLoss, align_faces, decode_latents, predict_x0, to_uint8_images,
)

log = logging.getLogger(__name__)

TIMESTEPS = torch.tensor([0, 250, 500, 999])


# ---------------------------------------------------------------- x̂0 from the model output

@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def noised(scheduler, dtype):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    return sample, noise, scheduler.add_noise(sample, noise, TIMESTEPS)


def test_predict_x0_inverts_the_noising_exactly_in_float64(scheduler):
    sample, noise, z_t = noised(scheduler, torch.float64)
    abar = scheduler.alphas_cumprod[TIMESTEPS]
    velocity = scheduler.get_velocity(sample, noise, TIMESTEPS)
    torch.testing.assert_close(predict_x0(z_t, noise, abar, "epsilon"), sample, rtol=0, atol=1e-10)
    torch.testing.assert_close(predict_x0(z_t, velocity, abar, "v_prediction"), sample, rtol=0, atol=1e-10)
    assert predict_x0(z_t, sample, abar, "sample") is sample


def test_predict_x0_float32_error_is_rounding_amplified_by_one_over_sqrt_abar(scheduler):
    """In float32 the ε inversion divides by sqrt(ᾱ_t) (0.0064 at t = 999 here), so the tolerance per item is
    2e-6 / sqrt(ᾱ_t): 2e-6 at t = 0, 3e-4 at t = 999 (measured: 6e-8 ... 1.8e-5). v needs no division: 1e-6."""
    sample, noise, z_t = noised(scheduler, torch.float32)
    abar = scheduler.alphas_cumprod[TIMESTEPS]
    error = (predict_x0(z_t, noise, abar, "epsilon") - sample).abs().amax(dim=(1, 2, 3))
    assert torch.all(error <= 2e-6 / abar.sqrt()), error
    velocity = scheduler.get_velocity(sample, noise, TIMESTEPS)
    assert (predict_x0(z_t, velocity, abar, "v_prediction") - sample).abs().max() <= 1e-6


def test_predict_x0_scalar_abar_low_precision_output_and_bad_input(scheduler):
    sample, noise, z_t = noised(scheduler, torch.float32)
    abar = scheduler.alphas_cumprod[500]
    one = predict_x0(z_t[2:3], noise[2:3].bfloat16(), float(abar), "epsilon")
    assert one.dtype == torch.float32  # a bf16 model output is promoted, not the result truncated
    torch.testing.assert_close(one, sample[2:3], rtol=0, atol=0.05)
    with pytest.raises(IDAdapterError, match="not one of epsilon, v_prediction, sample"):
        predict_x0(z_t, noise, abar, "flow")
    with pytest.raises(IDAdapterError, match="3 values for a batch of 4"):
        predict_x0(z_t, noise, scheduler.alphas_cumprod[:3], "epsilon")


# ---------------------------------------------------------------- differentiable alignment vs cv2

def aligned_both_ways(image_rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ours, cv2's) ArcFace crops of a float32 [0, 1] image, both float32 HWC."""
    ours = align_faces(torch.from_numpy(image_rgb).permute(2, 0, 1)[None], landmarks[None])[0]
    reference = cv2.warpAffine(image_rgb, arcface_matrix(landmarks, 112)[:2], (112, 112), borderValue=0.0)
    return ours.permute(1, 2, 0).numpy(), reference


def test_alignment_matches_cv2_on_a_real_photo():
    """obama.jpg with the stand-in pack's SCRFD landmarks, in 0-255 levels. Against cv2 on the float32 photo:
    measured max 0.006, mean 0.00015 (tolerance 0.02 / 0.001); against cv2 on the uint8 photo: max 0.502, mean 0.247,
    cv2's own rounding to uint8 (tolerance 0.51)."""
    assets = shared_assets_or_skip()
    analyzer = load_face_analyzer(assets / "insightface", "standin_scrfd_mbf128")
    rgb = to_rgb_uint8(load_image(str(assets / "faces" / "obama.jpg")))
    face = detect_face(analyzer, rgb, 0)
    ours, reference = aligned_both_ways(rgb.astype(np.float32) / 255.0, face.landmarks)
    difference = np.abs(ours - reference) * 255.0
    log.info("real photo, float32 cv2: max %.4f mean %.5f levels", difference.max(), difference.mean())
    assert difference.max() < 0.02 and difference.mean() < 0.001
    rounded = np.abs(ours * 255.0 - cv2.warpAffine(rgb, arcface_matrix(face.landmarks)[:2], (112, 112)))
    assert rounded.max() <= 0.51  # only cv2's rounding to uint8 separates them


def synthetic_image(height: int = 200, width: int = 160, seed: int = 0) -> np.ndarray:
    """Smooth random colours plus sharp-edged blocks: the edges would show any half-pixel misalignment."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 16, width // 16, 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(12):
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
        image[y:y + 20, x:x + 20] = rng.random(3)
    return np.clip(image, 0.0, 1.0)


def similar_landmarks(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    return (ARCFACE_TEMPLATE - 56.0) @ rotation.T + np.array(shift, np.float32)


@pytest.mark.parametrize("scale,degrees,shift", [
    (1.0, 0.0, (56.0, 56.0)),      # the template itself: the identity warp, the crop is the top-left 112x112
    (0.7, 17.0, (80.0, 90.0)),     # smaller and rotated: upsampling
    (1.6, -25.0, (60.0, 120.0)),   # larger and rotated, partly outside the image: the zero border
])
def test_alignment_matches_cv2_on_a_synthetic_image(scale, degrees, shift):
    """Against cv2 on the float32 image, in [0, 1] units: tolerance max 1e-4, mean 1e-6 (measured max 1e-5 for
    the first two, 3e-5 with the border, mean < 1e-6: float rounding only)."""
    image = synthetic_image()
    landmarks = similar_landmarks(scale, degrees, shift)
    ours, reference = aligned_both_ways(image, landmarks)
    difference = np.abs(ours - reference)
    log.info("synthetic %s: max %.5f mean %.6f", (scale, degrees, shift), difference.max(), difference.mean())
    assert difference.max() < 1e-4 and difference.mean() < 1e-6
    if scale == 1.0:
        np.testing.assert_allclose(ours, image[:112, :112], atol=1e-5)
    if scale == 1.6:
        assert (reference == 0).all(axis=-1).mean() > 0.05  # the case does reach the border


def test_alignment_of_a_batch_is_per_item():
    images = np.stack([synthetic_image(seed=1), synthetic_image(seed=2)])
    landmarks = np.stack([similar_landmarks(0.9, 5.0, (70.0, 80.0)), similar_landmarks(1.2, -10.0, (90.0, 110.0))])
    batch = align_faces(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(landmarks))
    assert batch.shape == (2, 3, 112, 112) and batch.dtype == torch.float32
    for item in range(2):
        alone, _ = aligned_both_ways(images[item], landmarks[item])
        np.testing.assert_array_equal(batch[item].permute(1, 2, 0).numpy(), alone)
    with pytest.raises(IDAdapterError, match=r"landmarks \(B, 5, 2\)"):
        align_faces(torch.zeros(2, 3, 64, 64), landmarks[:1])


# ---------------------------------------------------------------- gradients through a tiny VAE

class TinyRecognizer(nn.Module):
    """A stand-in for ArcFaceTorch's contract: (B, 3, 112, 112) RGB in [0, 1] -> (B, D) raw embedding."""

    def __init__(self, embed_dim: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 14 * 14, embed_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.norm(self.conv(image * 2.0 - 1.0))).flatten(1))


IMAGE_LANDMARKS = ARCFACE_TEMPLATE * 0.5 + 4.0
"""A face filling the middle of the 64x64 decoded image."""


class FixedGate:
    """Finds a face with IMAGE_LANDMARKS in the items `found` says; records what it was given."""

    def __init__(self, found: list[bool]) -> None:
        self.found = np.array(found)
        self.seen: list[np.ndarray] = []

    def __call__(self, images_rgb: np.ndarray) -> FaceDetections:
        self.seen.append(images_rgb)
        landmarks = np.where(self.found[:, None, None], IMAGE_LANDMARKS[None], 0.0).astype(np.float32)
        return FaceDetections(found=self.found.copy(), landmarks=landmarks)


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64,
        scaling_factor=0.5, shift_factor=0.1,
    )
    return vae.requires_grad_(False).eval()


def training_step(tiny_vae, scheduler, found: list[bool]):
    """z_t -> a 1x1 conv 'denoiser' (the upstream parameter) -> x̂0 -> VAE decode -> face-ID loss."""
    torch.manual_seed(1)
    head = nn.Conv2d(4, 4, kernel_size=1)
    recognizer = TinyRecognizer()
    z_t = torch.randn(2, 4, 32, 32)
    z0 = predict_x0(z_t, head(z_t), scheduler.alphas_cumprod[torch.tensor([100, 400])], "epsilon")
    z0.retain_grad()
    images = decode_latents(tiny_vae, z0)
    references = nn.functional.normalize(torch.randn(2, 16), dim=-1)
    gate = FixedGate(found)
    loss_fn = FaceIDLoss(recognizer, gate)
    output = loss_fn(images, references)
    output.loss.backward()
    return output, dict(head=head, recognizer=recognizer, z0=z0, images=images, references=references, gate=gate)


def test_loss_equals_the_cv2_aligned_reference_computation(tiny_vae, scheduler):
    output, parts = training_step(tiny_vae, scheduler, [True, True])
    images = parts["images"].detach()
    assert images.shape == (2, 3, 64, 64)
    assert (images.abs() < 1).float().mean() > 0.9  # the clamp keeps the gradient of nearly every pixel
    np.testing.assert_array_equal(parts["gate"].seen[0], to_uint8_images(images))
    expected = []
    for item in range(2):
        pixels = ((images[item].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        crop = cv2.warpAffine(pixels, arcface_matrix(IMAGE_LANDMARKS)[:2], (112, 112), borderValue=0.0)
        with torch.no_grad():
            embedding = parts["recognizer"](torch.from_numpy(crop).permute(2, 0, 1)[None])[0]
        expected.append(float(nn.functional.cosine_similarity(embedding, parts["references"][item], dim=0)))
    torch.testing.assert_close(output.cosine, torch.tensor(expected), rtol=0, atol=1e-4)
    assert output.loss.item() == pytest.approx(sum(1 - c for c in expected) / 2, abs=1e-4)
    assert output.gate.tolist() == [True, True]


def test_gradients_reach_the_latents_and_the_denoiser_but_not_the_frozen_models(tiny_vae, scheduler):
    _, parts = training_step(tiny_vae, scheduler, [True, True])
    for name, grad in (("z0", parts["z0"].grad), ("head", parts["head"].weight.grad)):
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    assert all(p.grad is None for p in tiny_vae.parameters())
    assert all(p.grad is None and not p.requires_grad for p in parts["recognizer"].parameters())


def test_item_without_a_face_gets_no_loss_and_no_gradient(tiny_vae, scheduler):
    both, _ = training_step(tiny_vae, scheduler, [True, True])
    output, parts = training_step(tiny_vae, scheduler, [True, False])
    assert output.gate.tolist() == [True, False]
    # the recognizer sees a batch of 1 instead of 2: equal up to the kernels' batch-size rounding
    assert output.cosine[0].item() == pytest.approx(both.cosine[0].item(), abs=1e-6) and torch.isnan(output.cosine[1])
    assert output.loss.item() == pytest.approx((1 - both.cosine[0].item()) / 2, abs=1e-6)  # divided by B, not by 1
    grad = parts["z0"].grad
    assert grad[0].abs().sum() > 0 and (grad[1] == 0).all()


def test_no_face_anywhere_gives_an_exact_zero_that_backpropagates_zeros(tiny_vae, scheduler):
    output, parts = training_step(tiny_vae, scheduler, [False, False])
    assert output.loss.item() == 0.0 and output.loss.ndim == 0 and output.loss.requires_grad
    assert output.gate.tolist() == [False, False] and torch.isnan(output.cosine).all()
    for grad in (parts["z0"].grad, parts["head"].weight.grad, parts["head"].bias.grad):
        assert grad is not None and (grad == 0).all()


class CountingDecoder:
    """`decode_latents` with the VAE, counting forward calls (and how many with gradients) and backward passes."""

    def __init__(self, vae) -> None:
        self.vae = vae
        self.forwards: list[tuple[int, bool]] = []
        self.backwards = 0

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        self.forwards.append((latents.shape[0], torch.is_grad_enabled()))
        images = decode_latents(self.vae, latents)
        if images.requires_grad:
            images.register_hook(self._count_backward)
        return images

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.backwards += 1


@pytest.mark.parametrize("found", [[True, False], [True, True]])
def test_from_latents_equals_the_loss_of_the_decoded_images(tiny_vae, scheduler, found):
    expected, parts = training_step(tiny_vae, scheduler, found)
    z0 = parts["z0"].detach().requires_grad_(True)
    decode = CountingDecoder(tiny_vae)
    output = FaceIDLoss(parts["recognizer"], FixedGate(found)).from_latents(decode, z0, parts["references"])
    output.loss.backward()
    assert output.gate.tolist() == found
    torch.testing.assert_close(output.cosine, expected.cosine, rtol=0, atol=1e-5, equal_nan=True)
    assert output.loss.item() == pytest.approx(expected.loss.item(), abs=1e-6)
    torch.testing.assert_close(z0.grad, parts["z0"].grad, rtol=1e-4, atol=1e-7)
    # once for the gate without gradients, then only the items with a face with them
    assert decode.forwards == [(2, False), (sum(found), True)] and decode.backwards == 1


def test_from_latents_without_a_face_never_runs_the_decoder_backward(tiny_vae, scheduler):
    _, parts = training_step(tiny_vae, scheduler, [False, False])
    z0 = parts["z0"].detach().requires_grad_(True)
    decode = CountingDecoder(tiny_vae)
    output = FaceIDLoss(parts["recognizer"], FixedGate([False, False])).from_latents(decode, z0, parts["references"])
    assert output.loss.item() == 0.0 and output.loss.requires_grad
    output.loss.backward()
    assert decode.forwards == [(2, False)] and decode.backwards == 0
    assert (z0.grad == 0).all()


def test_recognizer_stays_frozen_in_eval_mode():
    recognizer = TinyRecognizer().train()
    loss_fn = FaceIDLoss(recognizer, FixedGate([True])).train()
    assert loss_fn.training and not recognizer.training  # BatchNorm statistics never move
    assert not any(p.requires_grad for p in recognizer.parameters())
    with pytest.raises(IDAdapterError, match="reference_embeds must be"):
        loss_fn(torch.zeros(1, 3, 64, 64), torch.zeros(2, 16))


def test_decode_latents_unscales_and_refuses_a_trainable_vae(tiny_vae):
    z0 = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        expected = tiny_vae.decode(z0 / 0.5 + 0.1).sample
        torch.testing.assert_close(decode_latents(tiny_vae, z0), expected, rtol=0, atol=0)
        torch.testing.assert_close(decode_latents(tiny_vae, z0, scaling_factor=0.25),
                                   tiny_vae.decode(z0 / 0.25 + 0.1).sample, rtol=0, atol=0)
    tiny_vae.decoder.conv_out.weight.requires_grad_(True)
    try:
        with pytest.raises(IDAdapterError, match="requires_grad_"):
            decode_latents(tiny_vae, z0)
    finally:
        tiny_vae.decoder.conv_out.weight.requires_grad_(False)


# ---------------------------------------------------------------- the detector gate on the tiny SCRFD pack

@pytest.fixture(scope="module")
def tiny_analyzer(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    write_model_pack(root, "tiny_pack", embed_dim=16)
    return load_face_analyzer(root, "tiny_pack", "CPU", det_size=256)


ONE_FACE = [(128, 128, 64)]  # a stride-16 square
TWO_FACES = [(48, 48, 32), (176, 176, 64)]  # a stride-8 square and a larger stride-16 one


def expected_landmarks(centre_x: int, centre_y: int, side: int) -> np.ndarray:
    return LANDMARKS_IN_STRIDES * (side / 4) + np.array([centre_x, centre_y], np.float32)


def test_gate_finds_the_largest_face_in_image_pixels_and_none_in_a_blank(tiny_analyzer):
    blank = np.full((256, 256, 3), 128, np.uint8)
    images = np.stack([square_faces_image((256, 256), ONE_FACE), blank, square_faces_image((256, 256), TWO_FACES)])
    detections = FaceDetectorGate(tiny_analyzer, min_face_size=32)(images)
    assert detections.found.tolist() == [True, False, True]
    assert detections.landmarks.shape == (3, 5, 2) and detections.landmarks.dtype == np.float32
    np.testing.assert_allclose(detections.landmarks[0], expected_landmarks(*ONE_FACE[0]), atol=0.5)
    np.testing.assert_array_equal(detections.landmarks[1], 0.0)
    np.testing.assert_allclose(detections.landmarks[2], expected_landmarks(*TWO_FACES[1]), atol=0.5)


def test_gate_respects_min_face_size_and_detection_size(tiny_analyzer):
    image = square_faces_image((256, 256), ONE_FACE)[None]
    assert FaceDetectorGate(tiny_analyzer, min_face_size=64)(image).found.tolist() == [True]
    assert FaceDetectorGate(tiny_analyzer, min_face_size=65)(image).found.tolist() == [False]
    # detection size 512 scales the image x2: a 128 px square at a multiple of 32, found at stride 32, landmarks
    # mapped back to image pixels; at 384 it becomes 96 px, a size the tiny detector never finds (no fallback sizes)
    twice = FaceDetectorGate(tiny_analyzer, det_size=512)(image)
    assert twice.found.tolist() == [True]
    np.testing.assert_allclose(twice.landmarks[0], expected_landmarks(*ONE_FACE[0]), atol=0.5)
    assert FaceDetectorGate(tiny_analyzer, det_size=384, min_face_size=0)(image).found.tolist() == [False]
    with pytest.raises(IDAdapterError, match=r"\(B, H, W, 3\) RGB uint8"):
        FaceDetectorGate(tiny_analyzer)(image.astype(np.float32))


def test_face_id_loss_with_the_detector_gate_end_to_end(tiny_analyzer):
    images = np.stack([square_faces_image((256, 256), ONE_FACE), np.full((256, 256, 3), 128, np.uint8)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    pixels.requires_grad_(True)
    recognizer = TinyRecognizer().eval()
    crop = cv2.warpAffine(images[0], arcface_matrix(expected_landmarks(*ONE_FACE[0]))[:2], (112, 112))
    with torch.no_grad():
        reference = nn.functional.normalize(recognizer(torch.from_numpy(crop).permute(2, 0, 1)[None] / 255.0), dim=-1)
    output = FaceIDLoss(recognizer, FaceDetectorGate(tiny_analyzer, min_face_size=32))(pixels, reference.repeat(2, 1))
    assert output.gate.tolist() == [True, False]
    assert output.cosine[0].item() > 0.999 and torch.isnan(output.cosine[1])  # its own crop: cos 1 up to resampling
    output.loss.backward()
    assert pixels.grad[0].abs().sum() > 0 and (pixels.grad[1] == 0).all()
