"""Identity-conditioned generation through diffusers, as the trainer's sample grids and `eval` do it: the base model's
own pipeline (DDIM) with `DiffusersIDAdapter` attached to its UNet, E_r set on the adapter and E_c spliced in place of
the trigger word of "<prompt>, <class word> is <trigger word>" (DESIGN.md §2.3); the negative prompt is encoded
without identity. Each image's starting noise comes from its own seed, so an image depends on its prompt and seed
only, not on the batch it was generated in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from idadapter_core import DiffusersIDAdapter, IDAdapter

from .models import BaseModel


@dataclass(frozen=True)
class SamplingSettings:
    resolution: int
    """Width and height of the images, in pixels."""
    steps: int = 30
    """DDIM steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale."""
    negative_prompt: str = ""


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


@torch.no_grad()
def generate_identity_images(
    base: BaseModel, adapter: IDAdapter, binding: DiffusersIDAdapter, references: dict[str, torch.Tensor],
    prompts: Sequence[str], class_word: str, seeds: Sequence[int], settings: SamplingSettings,
) -> np.ndarray:
    """(len(prompts), H, W, 3) uint8 RGB: prompt i with seed i, conditioned on one identity. `references` holds the
    identity's N references' features ('clip_patches' (1, N, P, W), 'face_embeds' (1, N, D), 'clip_image_embeds'
    (1, N, E)) on the models' device; `binding` is the adapter attached to `base.unet`."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    text, count = base.text, len(prompts)
    embeds = adapter.encode(references["clip_patches"], references["face_embeds"], references["clip_image_embeds"])
    binding.set_identity(embeds.reference_tokens)
    try:
        positive = text.tokenize(list(prompts), [class_word] * count, [True] * count)
        negative = text.tokenize([settings.negative_prompt] * count, [class_word] * count, [False] * count)
        context, pooled = text.encode(positive, embeds.identity_tokens)
        negative_context, negative_pooled = text.encode(negative)
        extra = {}
        if base.is_sdxl:
            extra = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
        images = identity_pipeline(base)(
            prompt_embeds=context, negative_prompt_embeds=negative_context, height=settings.resolution,
            width=settings.resolution, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            generator=[torch.Generator().manual_seed(int(seed)) for seed in seeds], output_type="np", **extra,
        ).images
    finally:
        binding.set_identity(None)
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


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
