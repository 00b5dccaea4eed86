"""The trainer's generation (train/generate.py) for both methods on tiny local models, with guidance over the identity:
with "none (guided)" the negative half of each CFG step is exactly the null-identity model (IDAdapter: E_r = 0;
Inv-Adapter: the EAA off, the plain UNet) and the positive half is what "same as positive" gives it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_adapter, tiny_features
from idadapter_core import DiffusersIDAdapter
from idadapter_core.errors import IDAdapterError
from idadapter_core.hosts import DiffusersInvAdapter
from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig
from idadapter_core.schedule import NEGATIVE_IDENTITY_MODES
from train.config import FitConfig
from train.generate import (
    SAMPLING_REFERENCE_FEATURES, SamplingSettings, encode_reference, generate_identity_images, generate_inv_adapter_images,
)
from train.models import load_base_model
from train.tiny_models import RESOLUTION, write_tiny_pipeline

pytestmark = pytest.mark.usefixtures("no_downloads", "one_thread")

GUIDED, SAME = NEGATIVE_IDENTITY_MODES
PROMPTS = ["a portrait photo", "a photo of a man smiling"]
SEEDS = [3, 4]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def base(request, tmp_path_factory):
    folder = write_tiny_pipeline(tmp_path_factory.mktemp(request.param) / "base", request.param)
    return load_base_model(FitConfig(pretrained=str(folder)))


def settings(mode: str, guidance: float = 3.0) -> SamplingSettings:
    return SamplingSettings(RESOLUTION, steps=2, guidance=guidance, identity_in_negative=mode)


class UNetCalls:
    """The generation passes of the UNet (not the reference passes of Inv-Adapter): inputs and output."""

    def __init__(self, unet, skip=lambda: False) -> None:
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []
        self.skip = skip
        self.handle = unet.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output) -> None:
        if not self.skip():
            self.calls.append((args, dict(kwargs), output[0] if isinstance(output, tuple) else output.sample))

    def __enter__(self) -> "UNetCalls":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def rerun(unet, call) -> torch.Tensor:
    args, kwargs, _ = call
    with torch.no_grad():
        return unet(*args, **{**kwargs, "return_dict": False})[0]


def opened_idadapter(base) -> DiffusersIDAdapter:
    adapter = tiny_adapter(base.layout, open_gates=True).eval()
    with torch.no_grad():
        for kv in adapter.cross_kv:
            kv.to_k.diff.normal_(std=0.1)
            kv.to_v.diff.normal_(std=0.1)
    return DiffusersIDAdapter(base.unet, adapter)


def test_idadapter_guidance_over_the_identity(base):
    binding = opened_idadapter(base)
    adapter = binding.adapter
    patches, faces, image_embeds = tiny_features(adapter.config)
    references = {"clip_patches": patches, "face_embeds": faces, "clip_image_embeds": image_embeds}
    count = len(PROMPTS)
    try:
        generated = {}
        with UNetCalls(base.unet) as guided:
            generated[GUIDED] = generate_identity_images(base, adapter, binding, references, PROMPTS, "person", SEEDS,
                                                         settings(GUIDED))
        generated[SAME] = generate_identity_images(base, adapter, binding, references, PROMPTS, "person", SEEDS,
                                                   settings(SAME))
        assert generated[GUIDED].shape == (count, RESOLUTION, RESOLUTION, 3)
        assert not np.array_equal(generated[GUIDED], generated[SAME])
        tokens = adapter.encode(patches, faces, image_embeds).reference_tokens
        for call in guided.calls:  # each step: [negative x 2, positive x 2]
            output = call[2]
            assert len(output) == 2 * count
            binding.set_identity(torch.zeros_like(tokens))  # the null identity, as identity dropout trains it
            null = rerun(base.unet, call)
            binding.set_identity(tokens)  # both halves with the identity: "same as positive"
            same = rerun(base.unet, call)
            assert torch.equal(output[:count], null[:count]) and torch.equal(output[count:], same[count:])
            assert (null[:count] - same[:count]).abs().max() > 1e-4  # the negative half is not the identity's
    finally:
        binding.detach()


def test_without_guidance_both_modes_are_the_same(base):
    binding = opened_idadapter(base)
    patches, faces, image_embeds = tiny_features(binding.adapter.config)
    references = {"clip_patches": patches, "face_embeds": faces, "clip_image_embeds": image_embeds}
    try:
        images = [generate_identity_images(base, binding.adapter, binding, references, PROMPTS[:1], "person", SEEDS[:1],
                                           settings(mode, guidance=1.0)) for mode in NEGATIVE_IDENTITY_MODES]
    finally:
        binding.detach()
    assert np.array_equal(*images)
    with pytest.raises(IDAdapterError, match="unknown identity_in_negative 'guided'"):
        SamplingSettings(RESOLUTION, identity_in_negative="guided")


def test_ddim_eta_adds_seeded_noise_per_step(base):
    """η = 1 draws fresh noise at each DDIM step from the image's own seed: other images than η = 0, the same ones
    again for the same seeds."""
    binding = opened_idadapter(base)
    patches, faces, image_embeds = tiny_features(binding.adapter.config)
    references = {"clip_patches": patches, "face_embeds": faces, "clip_image_embeds": image_embeds}

    def generate(eta: float) -> np.ndarray:
        sampling = SamplingSettings(RESOLUTION, steps=3, guidance=1.0, eta=eta)
        return generate_identity_images(base, binding.adapter, binding, references, PROMPTS, "person", SEEDS, sampling)

    try:
        deterministic, stochastic, again = generate(0.0), generate(1.0), generate(1.0)
    finally:
        binding.detach()
    assert np.array_equal(stochastic, again)
    assert np.abs(stochastic.astype(int) - deterministic).mean() > 1


def opened_inv_adapter(base) -> DiffusersInvAdapter:
    torch.manual_seed(0)
    adapter = InvAdapter(InvAdapterConfig(base.layout)).eval()
    with torch.no_grad():
        for block in adapter.blocks:
            block.self_gate.fill_(0.8)
            block.cross_v.weight.normal_(std=0.3)
    return DiffusersInvAdapter(base.unet, adapter)


def reference(base) -> torch.Tensor:
    pixels = torch.rand(3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return encode_reference(base, pixels)


def test_inv_adapter_guidance_over_the_identity(base):
    binding = opened_inv_adapter(base)
    latent = reference(base)
    count = len(PROMPTS)
    try:
        with UNetCalls(base.unet, skip=lambda: binding.recording is not None) as guided:
            images = generate_inv_adapter_images(base, binding.adapter, binding, latent, PROMPTS, SEEDS,
                                                 settings(GUIDED), reference_features="noised")
        same = generate_inv_adapter_images(base, binding.adapter, binding, latent, PROMPTS, SEEDS, settings(SAME),
                                           reference_features="noised")
        assert images.shape == (count, RESOLUTION, RESOLUTION, 3) and not np.array_equal(images, same)
        assert len(guided.calls) == 2
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        null_context, null_pooled = base.text.encode(base.text.tokenize([""], [""], [False]))
        added = None
        if base.is_sdxl:
            added = {"text_embeds": null_pooled, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
        for call in guided.calls:
            timestep = int(call[0][1])
            output = call[2]
            bare = rerun(base.unet, call)  # the EAA off: the base model
            noised = base.noise_scheduler.add_noise(latent, noise, torch.tensor([timestep]))
            binding.set_reference(binding.record_reference(noised, timestep, null_context, added_cond_kwargs=added))
            with_eaa = rerun(base.unet, call)  # "same as positive": the EAA in every row
            binding.set_reference(None)
            assert torch.equal(output[:count], bare[:count])
            torch.testing.assert_close(output[count:], with_eaa[count:], rtol=0, atol=1e-6)  # (EAA rows: a sub-batch)
            assert (with_eaa[count:] - bare[count:]).abs().max() > 1e-3  # the EAA acts in the positive half
    finally:
        binding.detach()


@pytest.mark.parametrize("mode", SAMPLING_REFERENCE_FEATURES)
def test_inv_adapter_generates_from_its_reference(base, mode):
    """Every reference mode runs end to end and changes the base model's images; weight 0 gives the base's."""
    binding = opened_inv_adapter(base)
    latent = reference(base)
    try:
        generate = lambda: generate_inv_adapter_images(base, binding.adapter, binding, latent, PROMPTS, SEEDS,
                                                       settings(GUIDED), reference_features=mode, inversion_steps=3,
                                                       reference_timestep=50)
        images = generate()
        binding.weight = 0.0
        plain = generate()
    finally:
        binding.detach()
    assert images.dtype == np.uint8 and images.shape == (2, RESOLUTION, RESOLUTION, 3)
    assert np.abs(images.astype(int) - plain.astype(int)).max() > 0
    with pytest.raises(ValueError, match="reference_features must be one of noised, inversion, fixed"):
        generate_inv_adapter_images(base, binding.adapter, binding, latent, PROMPTS, SEEDS, settings(GUIDED),
                                    reference_features="magic")
