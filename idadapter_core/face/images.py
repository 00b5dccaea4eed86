"""Turning whatever users feed in (ComfyUI IMAGE tensors, arrays, files) into RGB uint8 arrays."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ImageFormatError


def to_rgb_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 RGB from grayscale, gray+alpha, RGB or RGBA; uint8, uint16 or floats in [0, 1]
    (a ComfyUI IMAGE). Transparent pixels are composited over white."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) < 1:
        raise ImageFormatError(f"expected an image (height, width, 1-4 channels), got shape {array.shape}")
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        values = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.floating):
        values = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise ImageFormatError(f"unsupported pixel type {array.dtype}; use uint8, uint16 or floats in [0, 1]")
    channels = values.shape[2]
    if channels in (2, 4):
        color, alpha = values[..., :-1], values[..., -1:]
        if alpha.max() > 0:  # an all-zero alpha channel is a broken export, not a fully transparent photo
            values = color * alpha + (1.0 - alpha)
        else:
            values = color
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return np.ascontiguousarray(np.round(values * 255.0).astype(np.uint8))


def load_image(path: str | Path) -> np.ndarray:
    """An image file as an array in its own depth (uint8, or uint16 for 16-bit grayscale), EXIF rotation applied;
    `to_rgb_uint8` then handles its channels."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode.startswith("I;16") or image.mode == "I":
            return np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
        if image.mode == "P":
            image = image.convert("RGBA")
        elif image.mode not in ("L", "LA", "RGB", "RGBA"):
            image = image.convert("RGB")
        return np.asarray(image)


def as_image_list(images: torch.Tensor | np.ndarray | Sequence) -> list:
    """A batch (B, H, W, C), one image (H, W, C) or a sequence of images -> a list of single images."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 3:
        return [images]
    return list(images)
