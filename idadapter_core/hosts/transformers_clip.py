"""Bind a transformers `CLIPVisionModelWithProjection` as the face features' CLIP encoder (the trainer's host,
and the tests' and benchmarks'). ComfyUI's own binding is `nodes/face_nodes.py: comfy_clip_encoder`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from ..face import ClipEncoder


def clip_encoder_from_transformers(
    model, image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None
) -> "ClipEncoder":
    """A `ClipEncoder` over a transformers `CLIPVisionModelWithProjection`: resize to the model's input (bicubic,
    antialiased, as ComfyUI's clip_preprocess), normalise (OpenAI CLIP's mean/std unless given), run, take
    hidden_states[-2]."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = int(model.config.image_size)
    parameter = next(model.parameters())
    mean = torch.tensor(OPENAI_CLIP_MEAN if image_mean is None else image_mean).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD if image_std is None else image_std).view(1, 3, 1, 1)

    @torch.no_grad()
    def encode(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = crops.movedim(-1, 1).float()
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
        pixels = ((pixels - mean) / std).to(device=parameter.device, dtype=parameter.dtype)
        out = model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2], out.image_embeds

    return encode
