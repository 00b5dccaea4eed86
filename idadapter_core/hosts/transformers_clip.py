"""Bind a transformers `CLIPVisionModelWithProjection` as the face features' CLIP encoder (the trainer's host,
and the tests' and benchmarks'). ComfyUI's own binding is `nodes/face_nodes.py: comfy_clip_encoder`.

The features must be the ones ComfyUI's Load CLIP Vision + Extract Face Features give for the same crops and
weights: IDAdapter weights trained on other features fail silently in ComfyUI. So this mirrors ComfyUI's
`comfy.clip_model.clip_preprocess(crop=False)` and `ClipVisionModel.encode_image` step by step;
tests/test_comfy_train.py compares the two on a ViT-L/14 loaded by ComfyUI's own loader."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from ..face import ClipEncoder

log = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.float32
"""ComfyUI keeps CLIP vision weights in float16 by default (`text_encoder_dtype`; the file's dtype with dynamic VRAM)
but runs them on float32 pixels through `comfy.ops.manual_cast`, which casts each weight to the input's dtype: the
forward is float32 whatever the storage. A float16 forward of the same weights is off by 0.6% (patch tokens) and 1%
(image embeds) of the features' scale, a bfloat16 copy of them by 0.4% (measured on a random ViT-L/14). Float32
weights are kept as they are: ComfyUI's own float16 rounding of a float32 file (0.4%) depends on how it runs."""


def comfy_clip_preprocess(
    crops: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """(N, H, W, C) RGB(A) floats in [0, 1] -> (N, 3, size, size) normalised pixels, as ComfyUI's
    `clip_preprocess(crop=False)`: extra channels dropped, resized to size x size when not already (bicubic,
    antialiased), clamped and rounded to 1/255 steps, then normalised. Without the clamp and rounding, crops resized
    for a 336 px (32 px) model give patch tokens off by 2.8% (1.2%); 224 px crops of uint8 pixels are unchanged."""
    pixels = crops[..., :3].float().movedim(-1, 1)
    if pixels.shape[-2] != size or pixels.shape[-1] != size:
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
    pixels = torch.clip(255.0 * pixels, 0, 255).round() / 255.0
    return (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def clip_encoder_from_transformers(
    model, image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None
) -> "ClipEncoder":
    """A `ClipEncoder` over a transformers `CLIPVisionModelWithProjection` giving ComfyUI's features (module
    docstring): ComfyUI's preprocessing (`comfy_clip_preprocess`; OpenAI CLIP's mean/std unless given, as ComfyUI's
    CLIP configs), a float32 forward (`COMPUTE_DTYPE`; a model in another dtype is converted to float32 in place at
    the first call, which is exact for float16 weights), and hidden_states[-2], the output of the second-to-last
    layer (ComfyUI's `intermediate_output=-2`), with the projected image embeds."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = int(model.config.image_size)
    mean = torch.tensor(OPENAI_CLIP_MEAN if image_mean is None else image_mean, dtype=torch.float32)
    std = torch.tensor(OPENAI_CLIP_STD if image_std is None else image_std, dtype=torch.float32)

    @torch.no_grad()
    def encode(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parameter = next(model.parameters())
        if parameter.dtype != COMPUTE_DTYPE:
            log.info("CLIP vision weights are %s; converting them to float32, the precision ComfyUI computes CLIP "
                     "vision features in", parameter.dtype)
            model.to(COMPUTE_DTYPE)
        pixels = comfy_clip_preprocess(crops, size, mean, std).to(parameter.device)
        with torch.autocast(parameter.device.type, enabled=False):  # float32 even inside a mixed-precision region
            out = model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2], out.image_embeds

    return encode
