"""Region masks at the transformer blocks' token grids (idadapter_core.masks), without a host."""
from __future__ import annotations

import pytest
import torch

from idadapter_core.errors import IDAdapterError
from idadapter_core.inv_adapter.eaa import EAABlock, EAAReferenceKV
from idadapter_core.masks import RegionMask, check_mask, token_grid


def unet_grids(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """The feature-map sizes of a UNet's levels: stride-2 convolutions with padding 1 round up."""
    grids = [(height, width)]
    for _ in range(levels - 1):
        h, w = grids[-1]
        grids.append(((h + 1) // 2, (w + 1) // 2))
    return grids


@pytest.mark.parametrize("height,width,levels", [
    (64, 64, 4),     # SD1.5 at 512x512
    (64, 96, 4),     # 512x768, portrait
    (96, 64, 4),     # 768x512, landscape
    (128, 128, 3),   # SDXL at 1024x1024 (its transformer levels: 64x64 and 32x32 blocks, below the first)
    (75, 100, 4),    # 600x800: odd sizes round up at each level
    (77, 45, 4),
    (8, 8, 2),       # the host tests' tiny UNet
])
def test_token_grid_is_the_unet_level_of_that_many_tokens(height, width, levels):
    for rows, columns in unet_grids(height, width, levels):
        assert token_grid((height, width), rows * columns) == (rows, columns)


def test_token_grid_falls_back_to_the_aspect_ratio_estimate():
    # 1200 tokens is no halving of 60x80 (60x80, 30x40, 15x20): 60 / sqrt(4800 / 1200) = 30 -> 30 rows x 40
    assert token_grid((60, 80), 1200) == (30, 40)
    # 48 tokens of a 64x96 latent: 64 / sqrt(6144 / 48) = 5.66 -> 5, 48 % 5 != 0 -> 6 rows x 8
    assert token_grid((64, 96), 48) == (6, 8)


def test_token_grid_refuses_a_count_it_cannot_lay_out():
    with pytest.raises(IDAdapterError, match="cannot lay out a block of 7 tokens"):
        token_grid((64, 64), 7)


def left_half(height: int = 64, width: int = 96, batch: int = 1) -> torch.Tensor:
    mask = torch.zeros(batch, height, width)
    mask[..., : width // 2] = 1.0
    return mask


@pytest.mark.parametrize("mask_hw", [(64, 96), (512, 768), (37, 200)])
def test_a_half_mask_of_any_size_is_a_half_at_every_grid(mask_hw):
    region = RegionMask(left_half(*mask_hw))
    for rows, columns in unet_grids(64, 96, 4):
        grid = region.at(rows * columns, 2, 2, (64, 96), torch.device("cpu"), torch.float32)
        assert grid.values.shape == (1, rows * columns, 1)
        image = grid.values.reshape(rows, columns)
        assert torch.equal(image[:, : columns // 2], torch.ones(rows, columns // 2))
        assert torch.equal(image[:, (columns + 1) // 2:], torch.zeros(rows, columns // 2))
        assert not grid.is_off and not grid.is_full


def test_a_mask_of_ones_or_zeros_says_so():
    ones, zeros = RegionMask(torch.ones(1, 30, 40)), RegionMask(torch.zeros(30, 40))
    cpu = torch.device("cpu")
    assert ones.at(96, 2, 2, (8, 12), cpu, torch.float32).is_full
    assert zeros.at(96, 2, 2, (8, 12), cpu, torch.float32).is_off


def test_a_mask_per_image_is_repeated_over_the_cond_and_uncond_chunks():
    masks = torch.stack([torch.zeros(8, 8), torch.ones(8, 8), torch.full((8, 8), 0.5)])
    region = RegionMask(masks)
    # 3 latent images, run as [cond x3, uncond x3] (2 chunks), or with two regional conds as 3 chunks
    for chunks in (1, 2, 3):
        grid = region.at(16, 3 * chunks, chunks, (8, 8), torch.device("cpu"), torch.float16)
        assert grid.values.shape == (3 * chunks, 16, 1) and grid.values.dtype == torch.float16
        assert grid.values[:, 0, 0].tolist() == [0.0, 1.0, 0.5] * chunks


def test_a_mask_batch_that_fits_neither_one_nor_every_image_is_refused():
    region = RegionMask(torch.ones(2, 8, 8))
    with pytest.raises(IDAdapterError, match="the mask holds 2 masks but the latent batch holds 3 images"):
        region.at(64, 6, 2, (8, 8), torch.device("cpu"), torch.float32)


def test_grids_are_cached_per_tokens_batch_device_and_dtype():
    region = RegionMask(left_half())
    cpu = torch.device("cpu")
    first = region.at(96, 2, 2, (64, 96), cpu, torch.float32)
    assert region.at(96, 2, 2, (64, 96), cpu, torch.float32) is first
    assert region.at(96, 2, 2, (64, 96), cpu, torch.float16) is not first
    region.clear()
    assert region.at(96, 2, 2, (64, 96), cpu, torch.float32) is not first


@pytest.mark.parametrize("mask,expected", [
    (None, "must be a MASK .* got NoneType"),
    ([[0.0, 1.0]], "must be a MASK .* got list"),
    (torch.ones(1, 3, 8, 8), r"has shape \(1, 3, 8, 8\); a MASK is \(H, W\) or \(B, H, W\)"),
    (torch.ones(8), r"has shape \(8,\)"),
    (torch.ones(0, 8, 8), "is empty"),
    (torch.ones(1, 0, 8), "is empty"),
    (torch.ones(8, 0), "is empty"),
    (torch.full((4, 4), float("nan")), "NaN or infinite"),
    (torch.tensor([[0.0, float("inf")]]), "NaN or infinite"),
    (torch.ones(4, 4, dtype=torch.complex64), "complex64 values"),
])
def test_unusable_masks_are_refused_saying_what_is_wrong(mask, expected):
    with pytest.raises(IDAdapterError, match=expected):
        check_mask(mask)


def test_boolean_and_two_dimensional_masks_are_accepted():
    mask = check_mask(torch.ones(4, 6, dtype=torch.bool))
    assert mask.shape == (1, 4, 6) and mask.dtype == torch.float32


def test_eaa_mask_confines_both_branches_exactly():
    torch.manual_seed(0)
    block = EAABlock(16)
    with torch.no_grad():
        block.self_gate.fill_(0.7)
        block.cross_v.weight.normal_()
    q, k, v = torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    ref = block.reference_kv(torch.randn(1, 5, 16))
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]).reshape(1, 6, 1)
    with torch.no_grad():
        for attend in (block.self_attention, block.cross_attention):
            own = attend(q, k, v, ref, 2, weight=0.0)
            full = attend(q, k, v, ref, 2)
            masked = attend(q, k, v, ref, 2, mask=mask)
            assert torch.equal(masked[:, 3:], own[:, 3:]) and torch.equal(masked[:, :3], full[:, :3])
            assert (full[:, :3] - own[:, :3]).abs().max() > 1e-3
            assert torch.equal(attend(q, k, v, ref, 2, mask=torch.ones(1, 6, 1)), full)
    assert isinstance(ref, EAAReferenceKV)


def test_a_mask_of_zeros_covers_nothing_and_one_lit_pixel_does():
    """Apply returns the model unpatched for a mask that is 0 everywhere (no reference pass, no per-block work)."""
    assert RegionMask(torch.zeros(2, 9, 7)).covers_nothing
    lit = torch.zeros(1, 64, 64)
    lit[0, 10, 50] = 0.01
    assert not RegionMask(lit).covers_nothing
