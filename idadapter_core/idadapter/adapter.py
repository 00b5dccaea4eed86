"""The visual adapter of IDAdapter: a gated self-attention block between self- and cross-attention of every
UNet transformer block (IDAdapter §3.4, eq. 7; docs/DESIGN.md §2.4):

    y := y + β·tanh(γ_attn)·S([y, E_r])[:len(y)]
    y := y + β·tanh(γ_ff)·FF(LN(y))

This is GLIGEN's GatedSelfAttentionDense (ComfyUI `comfy/gligen.py`) with two changes that do not change
the result: queries come from the visual tokens only (attending with all rows and keeping the visual ones
gives the same numbers for more work), and E_r's Linear, LayerNorm and K/V projections are computed once
per generation (`reference_kv`) because E_r does not change during sampling (docs/DESIGN.md, "Performance").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionFn, MultiHeadAttention, Operations, sdpa_attention
from ..presets import UNetLayout

FF_CHUNK_ROWS = 2048
"""Tokens per feed-forward call; measured on CPU (bench/step_overhead.py): 5 % faster adapter blocks and no extra
peak memory at 512², same output bit for bit."""


@dataclass
class ReferenceKV:
    """One block's keys and values of E_r, (B_ref, T, C) each."""

    key: torch.Tensor
    value: torch.Tensor

    def for_batch(self, batch: int) -> "ReferenceKV":
        """Tile the reference batch to match the visual batch. Both hosts stack CFG halves as whole chunks
        ([cond batch, uncond batch]), so identity b of every chunk gets reference b."""
        ref_batch = self.key.shape[0]
        if ref_batch == batch:
            return self
        if ref_batch == 1:  # a view: the concatenation with y's keys copies it anyway
            return ReferenceKV(self.key.expand(batch, -1, -1), self.value.expand(batch, -1, -1))
        if batch % ref_batch:
            raise ValueError(f"cannot match {ref_batch} identity embeddings to a batch of {batch} latents")
        repeats = batch // ref_batch
        return ReferenceKV(self.key.repeat(repeats, 1, 1), self.value.repeat(repeats, 1, 1))

    @staticmethod
    def per_chunk(chunks: "list[ReferenceKV]", rows_per_chunk: int) -> "ReferenceKV":
        """One ReferenceKV for a batch stacking equal chunks, each chunk's rows with its own references (guidance
        over the identity: the positive chunks the identity's, the negative ones the null identity's)."""
        tiled = [chunk.for_batch(rows_per_chunk) for chunk in chunks]
        return ReferenceKV(torch.cat([t.key for t in tiled]), torch.cat([t.value for t in tiled]))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, operations: Operations = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out * 2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class GatedSelfAttention(nn.Module):
    """One block's adapter. `channels` is the block width C, `context_dim` the width of E_r."""

    def __init__(
        self, channels: int, context_dim: int, heads: int, ff_mult: int = 4,
        operations: Operations = nn, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.linear = operations.Linear(context_dim, channels, device=device, dtype=dtype)
        self.attn = MultiHeadAttention(channels, heads, operations, device=device, dtype=dtype)
        self.ff = nn.Sequential(
            GEGLU(channels, channels * ff_mult, operations, device=device, dtype=dtype),
            operations.Linear(channels * ff_mult, channels, device=device, dtype=dtype),
        )
        self.norm1 = operations.LayerNorm(channels, device=device, dtype=dtype)
        self.norm2 = operations.LayerNorm(channels, device=device, dtype=dtype)
        # γ of eq. 7, initialised to 0 so an untrained adapter leaves the UNet exactly as it was [P].
        self.alpha_attn = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        self.alpha_dense = nn.Parameter(torch.zeros((), device=device, dtype=dtype))

    def reference_kv(self, e_r: torch.Tensor) -> ReferenceKV:
        """LayerNorm works per token, so LN(cat[y, e]) = cat[LN(y), LN(e)]: E_r's half is computed once."""
        normed = self.norm1(self.linear(e_r))
        return ReferenceKV(self.attn.to_k(normed), self.attn.to_v(normed))

    def forward(
        self, y: torch.Tensor, ref: ReferenceKV, weight: float = 1.0, attention: AttentionFn = sdpa_attention
    ) -> torch.Tensor:
        return y + self.residual(y, ref, weight, attention)

    def residual(
        self, y: torch.Tensor, ref: ReferenceKV, weight: float = 1.0, attention: AttentionFn = sdpa_attention
    ) -> torch.Tensor:
        """What the adapter adds to y (both gated terms), so a host can add it to its own residual stream.
        The attention's temporaries are freed before the feed-forward runs, the gates are applied in place and
        the feed-forward runs in row chunks, so a step allocates little beyond its output."""
        attn_term = self._attend(y, ref.for_batch(y.shape[0]), attention)
        attn_term.mul_(weight * torch.tanh(self.alpha_attn.to(y)))
        ff_term = self._feed_forward(self.norm2(y + attn_term))
        return ff_term.mul_(weight * torch.tanh(self.alpha_dense.to(y))).add_(attn_term)

    def _attend(self, y: torch.Tensor, ref: ReferenceKV, attention: AttentionFn) -> torch.Tensor:
        """S([y, E_r]) for y's rows: queries from y only, keys and values over y and E_r."""
        normed = self.norm1(y)
        attn = self.attn
        keys = torch.cat([attn.to_k(normed), ref.key.to(normed.dtype)], dim=1)
        values = torch.cat([attn.to_v(normed), ref.value.to(normed.dtype)], dim=1)
        return attn.to_out(attention(attn.to_q(normed), keys, values, attn.heads))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The GEGLU feed-forward over FF_CHUNK_ROWS tokens at a time, which bounds its 8C-wide temporaries."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= FF_CHUNK_ROWS:
            return self.ff(x)
        out = torch.empty_like(rows)
        for start in range(0, rows.shape[0], FF_CHUNK_ROWS):
            out[start : start + FF_CHUNK_ROWS] = self.ff(rows[start : start + FF_CHUNK_ROWS])
        return out.view_as(x)


class IDAdapterBlocks(nn.ModuleList):
    """One GatedSelfAttention per UNet transformer block, indexed in forward order."""

    def __init__(self, layout: UNetLayout, context_dim: int, operations: Operations = nn, device=None, dtype=None) -> None:
        super().__init__(
            GatedSelfAttention(channels, context_dim, heads, operations=operations, device=device, dtype=dtype)
            for channels, heads in zip(layout.block_channels, layout.block_heads)
        )

    def reference_kv(self, e_r: torch.Tensor) -> list[ReferenceKV]:
        return [block.reference_kv(e_r) for block in self]


class WeightDelta(nn.Module):
    """A trained difference to one frozen UNet weight (zero at init), stored as `<name>.diff`."""

    def __init__(self, out_features: int, in_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.diff = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))


class CrossAttentionKV(nn.Module):
    """The paper trains W_K and W_V of every cross-attention (docs/DESIGN.md §2.1); we keep them as differences
    from the training base so they also apply to fine-tuned checkpoints of the same family."""

    def __init__(self, channels: int, context_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.to_k = WeightDelta(channels, context_dim, device=device, dtype=dtype)
        self.to_v = WeightDelta(channels, context_dim, device=device, dtype=dtype)

    def shift(
        self, key: torch.Tensor, value: torch.Tensor, context: torch.Tensor, value_context: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values projected with the frozen weights -> those of W + scale·ΔW: K + scale·ΔW_K·c and
        V + scale·ΔW_V·c' (c, c' what was projected). For a host that sets the strength per step without
        touching the UNet's weights; the text context is short, so this costs almost nothing."""
        return (
            key.add(F.linear(context, self.to_k.diff.to(context)), alpha=scale),
            value.add(F.linear(value_context, self.to_v.diff.to(value_context)), alpha=scale),
        )
