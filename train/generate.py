"""Identity-conditioned generation through diffusers, as the trainer's sample grids and `eval` do it, for both
methods: the base model's own pipeline (DDIM with classifier-free guidance) with the method's binding on its UNet.

- IDAdapter (`generate_identity_images`): E_r set on the adapter (`DiffusersIDAdapter`) and E_c spliced in place of
  the trigger word of "<prompt>, <class word> is <trigger word>" (DESIGN.md §2.3); the negative prompt is encoded
  without identity suffix.
- Inv-Adapter (`generate_inv_adapter_images`): before every UNet call of the pipeline, a reference pass of the plain
  UNet on the reference latent at that step (on the null prompt, as trained) records every block's self-attention
  input, and the EAA (`DiffusersInvAdapter`) adds it. The reference at a step is, as `reference_features` says:
  "inversion" (the point of its DDIM inversion nearest to the step's noise level: as fit trains it by default and
  Apply Inv-Adapter takes it), "noised" (the reference forward-noised to the step's timestep with one fixed noise, as
  fit's `noised` trains it) or "fixed" (forward-noised to one low `reference_timestep` for every step: the option
  of DESIGN.md §3.2).
  `blocks` (a mode of `schedule.BLOCK_MODES`) chooses the transformer blocks the EAA acts in, as Apply Inv-Adapter's
  `blocks` input does ("skip highest resolution": its faster mode).

Guidance over the identity (`SamplingSettings.identity_in_negative`, `idadapter_core.schedule`): with "none
(guided)" the negative half of every CFG step gets the null identity, so the guidance scale pushes towards the
reference as it pushes towards the prompt. IDAdapter: E_r = 0 with the plain negative prompt, the input identity
dropout trains (the trained cross-attention K/V stay); Inv-Adapter: the EAA off in those rows, exactly the base
model. "same as positive" gives both halves the identity. With guidance <= 1 the pipeline runs the positive half
alone. Each image's starting noise comes from its own seed, so an image depends on its prompt and seed only, not on
the batch it was generated in.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from idadapter_core import DiffusersIDAdapter, IDAdapter
from idadapter_core.hosts import DiffusersInvAdapter
from idadapter_core.inv_adapter import InvAdapter
from idadapter_core.schedule import BLOCK_MODES, NEGATIVE_IDENTITY_MODES, adapter_blocks, identity_in_negative

from .config import REFERENCE_FEATURES
from .data import load_target_image
from .inv_adapter_step import invert_latent, trajectory_input
from .models import BaseModel

SAMPLING_REFERENCE_FEATURES = (*REFERENCE_FEATURES, "fixed")
"""Where Inv-Adapter's reference latent at a generation step comes from (module docstring): the training step's
choices, or one fixed low timestep."""
DEFAULT_REFERENCE_TIMESTEP = 100
"""The timestep of `reference_features="fixed"` (our choice, a low one: the reference nearly clean, as the
"one fixed small timestep" of DESIGN.md §3.2)."""


@dataclass(frozen=True)
class SamplingSettings:
    resolution: int
    """Width and height of the images, in pixels."""
    steps: int = 30
    """DDIM steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale."""
    negative_prompt: str = ""
    identity_in_negative: str = NEGATIVE_IDENTITY_MODES[0]
    """What the negative half of classifier-free guidance gets, one of `NEGATIVE_IDENTITY_MODES`: the null identity
    ("none (guided)") or the identity as the positive half ("same as positive")."""
    eta: float = 0.0
    """DDIM's η: 0 deterministic (DDIM), 1 as much fresh noise per step as ancestral DDPM sampling."""

    def __post_init__(self) -> None:
        identity_in_negative(self.identity_in_negative)  # refuses an unknown mode, naming the known ones


def identity_pipeline(base: BaseModel):
    """The base model's diffusers pipeline (SD or SDXL) on its loaded modules, with a DDIM scheduler of its own
    noise schedule and prediction type."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    encoders = list(base.text.encoders.values())
    if base.is_sdxl:
        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=encoders[0][1], text_encoder_2=encoders[1][1],
                                         tokenizer=encoders[0][0], tokenizer_2=encoders[1][0], unet=base.unet,
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=encoders[0][1], tokenizer=encoders[0][0],
                                       unet=base.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guides_over_identity(base: BaseModel, settings: SamplingSettings) -> bool:
    """Whether the pipeline's UNet batches are [negative half, positive half] (diffusers runs both halves when the
    guidance scale is above 1) and the negative half gets the null identity."""
    both_halves = settings.guidance > 1 and base.unet.config.time_cond_proj_dim is None
    return both_halves and not identity_in_negative(settings.identity_in_negative)


def _check_seeds(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")


def _run_pipeline(base: BaseModel, settings: SamplingSettings, seeds: Sequence[int], context: torch.Tensor,
                  pooled: torch.Tensor | None) -> np.ndarray:
    """(len(seeds), H, W, 3) uint8 from the prompts' encodings; the negative prompt is encoded here, without
    identity."""
    count = len(seeds)
    negative = base.text.tokenize([settings.negative_prompt] * count, [""] * count, [False] * count)
    negative_context, negative_pooled = base.text.encode(negative)
    extra = {}
    if base.is_sdxl:
        extra = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    images = identity_pipeline(base)(
        prompt_embeds=context, negative_prompt_embeds=negative_context, height=settings.resolution,
        width=settings.resolution, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
        eta=settings.eta, generator=[torch.Generator().manual_seed(int(seed)) for seed in seeds], output_type="np",
        **extra,
    ).images
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


@torch.no_grad()
def generate_identity_images(
    base: BaseModel, adapter: IDAdapter, binding: DiffusersIDAdapter, references: dict[str, torch.Tensor],
    prompts: Sequence[str], class_word: str, seeds: Sequence[int], settings: SamplingSettings,
) -> np.ndarray:
    """(len(prompts), H, W, 3) uint8 RGB: prompt i with seed i, conditioned on one identity. `references` holds the
    identity's N references' features ('clip_patches' (1, N, P, W), 'face_embeds' (1, N, D), 'clip_image_embeds'
    (1, N, E)) on the models' device; `binding` is the adapter attached to `base.unet`."""
    _check_seeds(prompts, seeds)
    text, count = base.text, len(prompts)
    embeds = adapter.encode(references["clip_patches"], references["face_embeds"], references["clip_image_embeds"])
    reference_tokens = embeds.reference_tokens
    if guides_over_identity(base, settings):  # rows [negative x count, positive x count]: E_r = 0, then E_r
        tokens = reference_tokens.expand(count, -1, -1)
        reference_tokens = torch.cat([torch.zeros_like(tokens), tokens])
    binding.set_identity(reference_tokens)
    try:
        positive = text.tokenize(list(prompts), [class_word] * count, [True] * count)
        context, pooled = text.encode(positive, embeds.identity_tokens)
        return _run_pipeline(base, settings, seeds, context, pooled)
    finally:
        binding.set_identity(None)


def unet_latent(latent: torch.Tensor, vae_config) -> torch.Tensor:
    """A VAE latent (e.g. its distribution's mean) shifted and scaled as the UNet takes it."""
    shift = vae_config.get("shift_factor") or 0.0
    return (latent - shift) * vae_config["scaling_factor"]


@torch.no_grad()
def encode_reference(base: BaseModel, pixels: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w): Inv-Adapter's reference latent of an image ((3, R, R) in [-1, 1], as `data.load_target_image`
    gives it): its VAE distribution's mean, as the UNet takes it."""
    vae = base.vae
    mean = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist.mean
    return unet_latent(mean.float(), vae.config)


def inv_adapter_reference(base: BaseModel, image: str | Path, resolution: int) -> tuple[np.ndarray, torch.Tensor]:
    """Inv-Adapter's reference from an image file, prepared as fit prepares its images (shorter side resized to
    `resolution`, centre-cropped): the (R, R, 3) uint8 image a grid shows, and its latent (`encode_reference`)."""
    pixels, _ = load_target_image(image, resolution)
    shown = ((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return shown, encode_reference(base, pixels)


def _reference_inputs(base: BaseModel, reference: torch.Tensor, mode: str,
                      inversion_steps: int, reference_timestep: int, reference_seed: int,
                      null_context: torch.Tensor, added: dict | None) -> Callable[[int], tuple[torch.Tensor, int]]:
    """timestep -> (the reference's UNet input for the reference pass of that step, the timestep it runs at)."""
    if mode not in SAMPLING_REFERENCE_FEATURES:
        raise ValueError(f"reference_features must be one of {', '.join(SAMPLING_REFERENCE_FEATURES)}, got '{mode}'")
    scheduler = base.noise_scheduler
    alphas = scheduler.alphas_cumprod.detach().double().cpu()
    if mode == "fixed" and not 0 <= reference_timestep < len(alphas):
        raise ValueError(f"reference_timestep must be in [0, {len(alphas) - 1}], got {reference_timestep}")
    if mode in ("noised", "fixed"):
        noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(reference_seed)).to(reference)

        def noised(timestep: int) -> tuple[torch.Tensor, int]:
            at = reference_timestep if mode == "fixed" else timestep
            return scheduler.add_noise(reference, noise, torch.tensor([at])), at

        return noised
    # the plain UNet inverts: the caller has set no reference yet
    sigmas, trajectory = invert_latent(base, reference, null_context, inversion_steps, added_cond_kwargs=added)

    def inverted(timestep: int) -> tuple[torch.Tensor, int]:
        return trajectory_input(sigmas, trajectory, float(alphas[timestep])).to(reference), timestep  # as fit trains

    return inverted


@torch.no_grad()
def generate_inv_adapter_images(
    base: BaseModel, adapter: InvAdapter, binding: DiffusersInvAdapter, reference_latent: torch.Tensor,
    prompts: Sequence[str], seeds: Sequence[int], settings: SamplingSettings, reference_features: str = "inversion",
    inversion_steps: int = 50, reference_timestep: int = DEFAULT_REFERENCE_TIMESTEP, reference_seed: int = 0,
    blocks: str = BLOCK_MODES[0],
) -> np.ndarray:
    """(len(prompts), H, W, 3) uint8 RGB: prompt i with seed i, conditioned on one reference image.
    `reference_latent` (1, C, h, w) is its VAE latent as the UNet takes it (`encode_reference`), on the models'
    device; `binding` is `adapter` attached to `base.unet`. `reference_features`: "noised", "inversion" (with
    `inversion_steps` DDIM inversion steps) or "fixed" (at `reference_timestep`), see the module docstring;
    `reference_seed` seeds the reference's noise; `blocks`, a mode of `BLOCK_MODES`, where the EAA acts."""
    _check_seeds(prompts, seeds)
    if binding.adapter is not adapter:
        raise ValueError("the binding holds another Inv-Adapter than the one given; attach this adapter")
    text, count, unet = base.text, len(prompts), base.unet
    null_context, null_pooled = text.encode(text.tokenize([""], [""], [False]))
    added = None
    if base.is_sdxl:  # the reference pass's size conditioning: the generated images' (no crop)
        size = float(settings.resolution)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=null_pooled.device)
        added = {"text_embeds": null_pooled.to(unet.dtype), "time_ids": time_ids.to(unet.dtype)}
    binding.set_reference(None)
    reference_at = _reference_inputs(base, reference_latent, reference_features, inversion_steps,
                                     reference_timestep, reference_seed, null_context, added)
    guided = guides_over_identity(base, settings)
    recorded: dict[int, list[torch.Tensor]] = {}
    """The last reference pass, by the timestep it ran at (with "fixed", the only one)."""

    def set_step_reference(module, args, kwargs) -> None:
        if binding.recording is not None:  # the reference pass itself
            return
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        step = int(torch.as_tensor(timestep).reshape(-1)[0])
        latent, at = reference_at(step)
        if at not in recorded:
            recorded.clear()
            recorded[at] = binding.record_reference(latent.to(unet.dtype), at, null_context.to(unet.dtype),
                                                    added_cond_kwargs=added)
        rows = None
        if guided:  # rows [negative x count, positive x count]: the EAA in the positive half only
            if len(sample) != 2 * count:
                raise RuntimeError(f"expected a guidance batch of {2 * count} rows, the UNet got {len(sample)}")
            rows = torch.arange(len(sample)) >= count
        binding.set_reference(recorded[at], rows)

    handle = unet.register_forward_pre_hook(set_step_reference, with_kwargs=True)
    binding.blocks = adapter_blocks(base.layout, blocks)
    try:
        context, pooled = text.encode(text.tokenize(list(prompts), [""] * count, [False] * count))
        return _run_pipeline(base, settings, seeds, context, pooled)
    finally:
        handle.remove()
        binding.set_reference(None)
        binding.blocks = None


def image_grid(rows: Sequence[Sequence[np.ndarray]], tile: int, background: int = 255) -> np.ndarray:
    """(len(rows)·tile, columns·tile, 3) uint8: each row's RGB uint8 images side by side, resized (bicubic) to
    tile x tile where they are not already; rows shorter than the longest are filled with `background`."""
    columns = max(len(row) for row in rows)
    grid = np.full((len(rows) * tile, columns * tile, 3), background, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image.shape[:2] != (tile, tile):
                image = np.asarray(Image.fromarray(image).resize((tile, tile), Image.BICUBIC))
            grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = image
    return grid
