"""Region masks for the adapters: where in the image an identity acts (several people in one image).

An Apply node's MASK ((H, W) or (B, H, W), any size; values clamped to [0, 1]) multiplies what the adapter adds, per
transformer block, at that block's token grid. The grid follows the latent's aspect ratio: a UNet halves the latent's height and width (rounding
up) at each level, so the grid of a block with T tokens is the halving of the latent's (H, W) that holds T tokens;
models that downsample otherwise fall back to the estimate ComfyUI's mask-aware packs use (IPAdapter_plus:
h = H / sqrt(H·W / T), one more when T is not a multiple of it, w = T // h). The mask is resized bilinearly to the
grid and cached per grid, batch, device and dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import IDAdapterError


def check_mask(mask: object, name: str = "mask") -> torch.Tensor:
    """A MASK as a (B, H, W) float32 tensor clamped to [0, 1] (a resized mask overshoots: bicubic gives -0.1 ... 1.1,
    which would turn the adapter negative or past full strength); a clear error when it is not a usable mask."""
    if not isinstance(mask, torch.Tensor):
        raise IDAdapterError(
            f"{name} must be a MASK (a tensor of shape (H, W) or (B, H, W)), got {type(mask).__name__}; connect a "
            "MASK output (e.g. Solid Mask, Load Image's MASK, a mask editor) to it."
        )
    if mask.is_complex():
        raise IDAdapterError(f"{name} holds {mask.dtype} values; a mask holds real numbers from 0 to 1.")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise IDAdapterError(
            f"{name} has shape {tuple(mask.shape)}; a MASK is (H, W) or (B, H, W). Use a mask node's output, "
            "not an IMAGE or LATENT."
        )
    if mask.numel() == 0:
        raise IDAdapterError(
            f"{name} is empty (shape {tuple(mask.shape)}); give a mask with at least one pixel, e.g. Solid Mask."
        )
    mask = mask.detach().float()
    if not torch.isfinite(mask).all():
        raise IDAdapterError(
            f"{name} holds NaN or infinite values; a mask holds numbers from 0 (adapter off) to 1 (full strength)."
        )
    return mask.clamp(0.0, 1.0)


def mask_batch_mismatch(masks: int, images: int) -> str:
    """Why a batch of `masks` masks does not fit a latent batch of `images` images, and the masks that would."""
    given = f"the mask holds {masks} masks but the latent batch holds {images} image{'s' if images > 1 else ''}"
    if images == 1:
        return f"{given}; give a single mask (a batch of 1)."
    return f"{given}; give either 1 mask (used for every image) or {images} masks (one per image, in the batch's order)."


def token_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (rows, columns) of a transformer block holding `tokens` tokens of a latent of (height, width)."""
    height, width = latent_hw
    rows, columns = height, width
    while rows * columns > tokens:
        rows, columns = -(-rows // 2), -(-columns // 2)
    if rows * columns == tokens:
        return rows, columns
    rows = int(height / math.sqrt(height * width / tokens))
    rows += int(tokens % rows != 0)
    columns = tokens // rows
    if rows * columns != tokens:
        raise IDAdapterError(
            f"cannot lay out a block of {tokens} tokens on a grid of the latent's aspect ratio ({height}x{width}); "
            "this model downsamples in a way the region mask does not know. Run without a mask."
        )
    return rows, columns


@dataclass(frozen=True)
class GridMask:
    """A mask at one block's token grid: `values` (1 or B, T, 1) to multiply the adapter's contribution by, and
    whether it is 0 everywhere (`is_off`: the adapter can be skipped) or 1 everywhere (`is_full`: no mask needed)."""

    values: torch.Tensor
    is_off: bool
    is_full: bool


class RegionMask:
    """One Apply node's mask, resized to each block's token grid when the block first asks (cached)."""

    def __init__(self, mask: object) -> None:
        self.mask = check_mask(mask)
        self._grids: dict[tuple, GridMask] = {}

    @property
    def covers_nothing(self) -> bool:
        """0 everywhere: every block's grid is 0 too (bilinear resizing keeps it), so the adapter adds nothing."""
        return not bool(self.mask.any())

    def at(self, tokens: int, batch: int, chunks: int, latent_hw: tuple[int, int], device: torch.device,
           dtype: torch.dtype) -> GridMask:
        """The mask for a block of `tokens` tokens whose batch of `batch` rows stacks `chunks` equal chunks (the
        conds and unconds a sampler runs together, each holding the latent batch). A mask of one image applies to
        every row; a mask per latent image is repeated over the chunks."""
        key = (tokens, batch, chunks, tuple(latent_hw), device, dtype)
        grid = self._grids.get(key)
        if grid is None:
            grid = self._grids[key] = self._resize(tokens, batch, chunks, latent_hw, device, dtype)
        return grid

    def _resize(self, tokens: int, batch: int, chunks: int, latent_hw: tuple[int, int], device: torch.device,
                dtype: torch.dtype) -> GridMask:
        rows, columns = token_grid(latent_hw, tokens)
        masks = self.mask.shape[0]
        images = batch // chunks if batch % chunks == 0 else batch
        if masks not in (1, images):
            raise IDAdapterError(mask_batch_mismatch(masks, images))
        resized = F.interpolate(self.mask[:, None], size=(rows, columns), mode="bilinear", align_corners=False)
        values = resized.reshape(masks, tokens, 1)
        if 1 < masks < batch:
            values = values.repeat(batch // masks, 1, 1)
        return GridMask(values.to(device=device, dtype=dtype), bool((values == 0).all()), bool((values == 1).all()))

    def clear(self) -> None:
        self._grids.clear()
