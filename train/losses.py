"""IDAdapter's face identity loss (DESIGN.md §2.5): L = L_SD + F(x̂0)·λ·L_id, L_id = 1 − cos(R(x̂0), f_a).

The paper fixes the formula, the detector gate F and λ = 0.1; how x̂0 reaches the recognizer is ours ([I] in
DESIGN.md §2.5): the one-step x̂0 from the model output (`predict_x0`), decoded by the frozen VAE with gradients
(`decode_latents`; `FaceIDLoss.from_latents` decodes with gradients only the items that show a face), a face
detector on a detached uint8 copy giving the gate and 5 landmarks
(`FaceDetectorGate`, the model pack's SCRFD in place of the paper's RetinaFace), a differentiable similarity warp
onto insightface's ArcFace template (`align_faces`), then ArcFace as a torch module and 1 − cos with the
reference embedding (`FaceIDLoss`). λ is applied by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from idadapter_core.errors import IDAdapterError
from idadapter_core.face import FaceAnalyzer, arcface_matrix

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""diffusers' names for what the denoiser predicts (`scheduler.config.prediction_type`)."""


def predict_x0(
    z_t: torch.Tensor, model_output: torch.Tensor, alphas_cumprod_t: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
    """The one-step estimate of the clean latent z0 from the noisy latent z_t and the model output (DESIGN.md §2.5).

    epsilon:      z0 = (z_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)
    v_prediction: z0 = sqrt(ᾱ_t)·z_t − sqrt(1 − ᾱ_t)·v̂
    sample:       z0 = the model output

    `alphas_cumprod_t` is ᾱ at each item's timestep, shape (B,) or a scalar. Computed in at least float32 (at large
    t, 1/sqrt(ᾱ_t) is about 15 and would amplify bf16 rounding); the result has the promoted dtype."""
    if prediction_type not in PREDICTION_TYPES:
        raise IDAdapterError(
            f"prediction type '{prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}; use the scheduler's "
            "config.prediction_type"
        )
    if prediction_type == "sample":
        return model_output
    dtype = torch.promote_types(torch.promote_types(z_t.dtype, model_output.dtype), torch.float32)
    abar = torch.as_tensor(alphas_cumprod_t, dtype=dtype, device=z_t.device)
    if abar.ndim == 1:
        if abar.shape[0] != z_t.shape[0]:
            raise IDAdapterError(
                f"alphas_cumprod_t has {abar.shape[0]} values for a batch of {z_t.shape[0]}; pass ᾱ at each item's "
                "timestep (scheduler.alphas_cumprod[timesteps])"
            )
        abar = abar.reshape(-1, *([1] * (z_t.ndim - 1)))
    elif abar.ndim != 0:
        raise IDAdapterError(f"alphas_cumprod_t must be a scalar or of shape (batch,), got {tuple(abar.shape)}")
    z_t, model_output = z_t.to(dtype), model_output.to(dtype)
    if prediction_type == "epsilon":
        return (z_t - (1.0 - abar).sqrt() * model_output) / abar.sqrt()
    return abar.sqrt() * z_t - (1.0 - abar).sqrt() * model_output


def decode_latents(vae: nn.Module, z0: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
    """VAE-decode latents with gradients flowing back to `z0` (DESIGN.md §2.5 [I]): (B, 3, H, W) in about [-1, 1].

    The latents are unscaled as diffusers' pipelines do: z0 / scaling_factor + shift_factor, both read from
    `vae.config` (`scaling_factor` overrides the first). The VAE must be frozen by the caller
    (`vae.requires_grad_(False)`): the loss trains the adapter, never the VAE."""
    if any(p.requires_grad for p in vae.parameters()):
        raise IDAdapterError(
            "the VAE has trainable parameters; freeze it with vae.requires_grad_(False) before the face-ID loss "
            "(gradients must reach the latents only)"
        )
    config = vae.config
    scale = config["scaling_factor"] if scaling_factor is None else scaling_factor
    shift = config.get("shift_factor") or 0.0
    latents = z0 / scale + shift
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


def align_faces(images: torch.Tensor, landmarks: torch.Tensor | np.ndarray, size: int = 112) -> torch.Tensor:
    """Differentiable ArcFace alignment: (B, 3, H, W) images in [0, 1] and (B, 5, 2) landmarks in image pixels ->
    (B, 3, size, size) crops on insightface's template.

    The matrix is insightface's own (`arcface_matrix`, i.e. `face_align.estimate_norm`); the warp reproduces
    `cv2.warpAffine(image, M, (size, size))` as `norm_crop` calls it (bilinear, zero border, pixel centres at
    integer coordinates) with `grid_sample`, so gradients reach the image. Done in float32: normalised grid
    coordinates in bf16 would be off by up to half a pixel."""
    points = landmarks.detach().cpu().numpy() if isinstance(landmarks, torch.Tensor) else np.asarray(landmarks)
    if images.ndim != 4 or points.shape != (images.shape[0], 5, 2):
        raise IDAdapterError(
            f"align_faces needs images (B, 3, H, W) and landmarks (B, 5, 2); got {tuple(images.shape)} and "
            f"{tuple(points.shape)}"
        )
    height, width = images.shape[-2:]
    # cv2.warpAffine samples the source at M^-1 · (x, y, 1) for every output pixel (x, y)
    inverse = np.stack([np.linalg.inv(arcface_matrix(p, size))[:2] for p in points])
    inverse = torch.from_numpy(inverse).to(device=images.device, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64, device=images.device),
                            torch.arange(size, dtype=torch.float64, device=images.device), indexing="ij")
    target = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # (size, size, 3)
    source = torch.einsum("bij,hwj->bhwi", inverse, target)  # (B, size, size, 2) source pixel x, y
    # align_corners=False: normalised -1 / +1 are the outer edges of the first / last pixel
    extent = torch.tensor([width, height], dtype=torch.float64, device=images.device)
    grid = ((2.0 * source + 1.0) / extent - 1.0).to(torch.float32)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class FaceDetections:
    found: np.ndarray
    """(B,) bool: the gate F(x̂0) of each item."""
    landmarks: np.ndarray
    """(B, 5, 2) float32 landmarks in image pixels (insightface order); zeros where no face was found."""


FaceGate = Callable[[np.ndarray], FaceDetections]
"""Anything that maps (B, H, W, 3) RGB uint8 images to `FaceDetections` (a `FaceDetectorGate`, or a test stub)."""


class FaceDetectorGate:
    """The gate F of DESIGN.md §2.5: is there a face in x̂0, and where are its 5 landmarks.

    The paper uses RetinaFace; we use the model pack's own detector (SCRFD) through `FaceAnalyzer.detect`, once per
    image at `det_size` (no fallback sizes, unlike reference detection: a training step should not run the detector
    five times on faceless images). Like `detect_face`, the largest face is kept, and a face whose box is shorter
    than `min_face_size` pixels counts as none ([I]: too small to align reliably). Works on numpy only, never
    on tensors with gradients."""

    def __init__(self, analyzer: FaceAnalyzer, det_size: int | None = None, min_face_size: int = 64) -> None:
        self.analyzer = analyzer
        self.det_size = analyzer.det_size if det_size is None else det_size
        self.min_face_size = min_face_size

    def __call__(self, images_rgb: np.ndarray) -> FaceDetections:
        if images_rgb.ndim != 4 or images_rgb.shape[-1] != 3 or images_rgb.dtype != np.uint8:
            raise IDAdapterError(
                f"the face gate needs (B, H, W, 3) RGB uint8 images, got {images_rgb.dtype} {tuple(images_rgb.shape)}"
            )
        found = np.zeros(len(images_rgb), bool)
        landmarks = np.zeros((len(images_rgb), 5, 2), np.float32)
        for index, image in enumerate(images_rgb):
            boxes, points = self.analyzer.detect(np.ascontiguousarray(image), self.det_size)
            if not len(boxes):
                continue
            widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            largest = int(np.argmax(widths * heights))
            if min(widths[largest], heights[largest]) >= self.min_face_size:
                found[index] = True
                landmarks[index] = points[largest]
        return FaceDetections(found=found, landmarks=landmarks)


@dataclass
class FaceIDLossOutput:
    loss: torch.Tensor
    """Scalar: sum over items of F_b·(1 − cos_b), divided by the batch size (λ not applied)."""
    gate: torch.Tensor
    """(B,) bool: whether a face was found in each item."""
    cosine: torch.Tensor
    """(B,) float32, detached: cos(R(x̂0_b), f_a_b), NaN where no face was found."""


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """A detached (B, H, W, 3) RGB uint8 copy of (B, 3, H, W) images in [-1, 1], as a user would see them."""
    pixels = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class FaceIDLoss(nn.Module):
    """L_id of DESIGN.md §2.5 with the detector gate: sum_b F_b·(1 − cos(R(align(x̂0_b)), f_a_b)) / B.

    Reduction ([I], our choice): dividing by the whole batch size, not by the number of faces found, keeps the
    loss scale independent of how often the gate opens (few faces at large t would otherwise weigh as much as
    many), and it equals the paper's expectation of F·L_id over the batch. When no item has a face the loss is
    an exact 0 that is still part of the graph, so `backward()` runs and gives zero gradients.

    `recognizer` maps (B, 3, S, S) RGB in [0, 1] to raw embeddings (B, D), as insightface's `get_feat` would; it is
    frozen and kept in eval mode (its BatchNorm statistics must not move). The decoded images are clamped to
    [-1, 1] ([I]: the recognizer sees the image the detector and a user see; saturated pixels get no gradient)."""

    def __init__(self, recognizer: nn.Module | Callable[[torch.Tensor], torch.Tensor], gate: FaceGate,
                 arcface_size: int = 112) -> None:
        super().__init__()
        self.recognizer = recognizer
        self.gate = gate
        self.arcface_size = arcface_size
        if isinstance(recognizer, nn.Module):
            recognizer.requires_grad_(False)
            recognizer.eval()

    def train(self, mode: bool = True) -> "FaceIDLoss":
        super().train(mode)
        if isinstance(self.recognizer, nn.Module):
            self.recognizer.eval()
        return self

    def forward(self, images: torch.Tensor, reference_embeds: torch.Tensor) -> FaceIDLossOutput:
        """The loss of decoded images (B, 3, H, W) in [-1, 1]."""
        return self.from_latents(lambda decoded: decoded, images, reference_embeds)

    def from_latents(self, decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                     reference_embeds: torch.Tensor) -> FaceIDLossOutput:
        """The loss of x̂0 latents, decoded by `decode` (e.g. `decode_latents` with the VAE) only as far as needed:
        once without gradients for the gate, then again with gradients for the items that show a face. An item
        without a face then costs one decoder forward and no decoder backward (x̂0 at large t, and early in
        training, rarely shows a face), one with a face a second forward; DESIGN.md §2.5 [I]. The loss equals
        `forward(decode(latents))` up to the decoder's batch-size rounding."""
        batch = latents.shape[0]
        if reference_embeds.ndim != 2 or reference_embeds.shape[0] != batch:
            raise IDAdapterError(
                f"reference_embeds must be (batch, D) with batch {batch} (one mean reference ArcFace embedding per "
                f"image), got {tuple(reference_embeds.shape)}"
            )
        with torch.no_grad():
            preview = decode(latents)
        detections = self.gate(to_uint8_images(preview))
        found = torch.as_tensor(np.asarray(detections.found, bool))
        device = latents.device
        cosine = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
        if not found.any():
            # an empty slice sums to an exact 0 with a grad_fn (and no NaN from 0 * inf)
            return FaceIDLossOutput(latents[:0].sum().float(), found.to(device), cosine)
        index = found.nonzero().squeeze(1)
        pixels = (decode(latents[index.to(device)]).clamp(-1.0, 1.0) + 1.0) / 2.0
        crops = align_faces(pixels, np.asarray(detections.landmarks)[index.numpy()], self.arcface_size)
        embeddings = self.recognizer(crops.to(_module_dtype(self.recognizer, crops.dtype)))
        references = reference_embeds[index.to(reference_embeds.device)].to(embeddings.device)
        similarity = F.cosine_similarity(embeddings.float(), references.float(), dim=-1)
        cosine[index.to(device)] = similarity.detach().to(device)
        loss = (1.0 - similarity).sum() / batch
        return FaceIDLossOutput(loss, found.to(device), cosine)


def _module_dtype(module: object, default: torch.dtype) -> torch.dtype:
    """The dtype of a module's first floating parameter (a bf16 recognizer gets bf16 crops), else `default`."""
    if isinstance(module, nn.Module):
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return default
