"""The Embedded Attention Adapter (EAA) of Inv-Adapter, one per UNet transformer block (docs/DESIGN.md §3.3).

The paper's body is unavailable; this form is our inference from its abstract and figure captions ("extra linear
layers in self- and cross-attention" fed by diffusion features of the reference, 48 M parameters):

    self-attention   o  = Attn(Q, K, V)                                   the block's own attention
                     o' = Attn(Q, [K; W'_K F], [V; W'_V F])               reference tokens appended to K/V
                     out = o + β·tanh(γ)·(o' − o)                         γ learned, 0 at init
    cross-attention  out = Attn(Q, K_txt, V_txt) + β·Attn(Q, W''_K F, W''_V F)     W''_V zero at init

F is the block's self-attention input norm1(h) recorded in the reference pass; Q, K, V, K_txt, V_txt are the
frozen block's own projections; β is the node's weight. The gate γ (0 at init) and the zero W''_V make an untrained
EAA leave the UNet bit-identical, and weight 0 skips both branches. 4·ΣC² parameters: 49.6 M on SD1.5.
A region mask (one value per token, `mask`) multiplies what each branch adds: own + mask·β·tanh(γ)·(o' − o) and
Attn(Q, K_txt, V_txt) + mask·β·Attn(Q, W''_K F, W''_V F); where it is 0 the block's own output is left exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ..attention import (
    AttentionFn, Operations, attention_with_lse, has_lse_attention, merged_attention_change, sdpa_attention,
)
from ..presets import UNetLayout


@dataclass
class EAAReferenceKV:
    """One block's projections of the reference features F, (B_ref, T_ref, C) each."""

    self_key: torch.Tensor
    self_value: torch.Tensor
    cross_key: torch.Tensor
    cross_value: torch.Tensor

    def for_batch(self, batch: int) -> "EAAReferenceKV":
        """Tile the reference over the generation batch (both CFG halves and every image get the same reference)."""
        ref_batch = self.self_key.shape[0]
        if ref_batch == batch:
            return self
        if batch % ref_batch:
            raise ValueError(f"cannot match {ref_batch} reference feature sets to a batch of {batch} latents")
        repeats = batch // ref_batch
        return EAAReferenceKV(*(t.repeat(repeats, 1, 1) for t in (self.self_key, self.self_value, self.cross_key, self.cross_value)))


class EAABlock(nn.Module):
    """The EAA of one transformer block of width `channels`."""

    def __init__(self, channels: int, operations: Operations = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.self_k = operations.Linear(channels, channels, bias=False, device=device, dtype=dtype)
        self.self_v = operations.Linear(channels, channels, bias=False, device=device, dtype=dtype)
        self.cross_k = operations.Linear(channels, channels, bias=False, device=device, dtype=dtype)
        self.cross_v = operations.Linear(channels, channels, bias=False, device=device, dtype=dtype)
        self.self_gate = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        if device is None or torch.device(device).type != "meta":
            nn.init.zeros_(self.cross_v.weight)

    def reference_kv(self, features: torch.Tensor) -> EAAReferenceKV:
        return EAAReferenceKV(self.self_k(features), self.self_v(features), self.cross_k(features), self.cross_v(features))

    def self_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: EAAReferenceKV, heads: int,
        weight: float = 1.0, attention: AttentionFn = sdpa_attention, own_attention: AttentionFn | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the block's own q/k/v (already projected), with the reference tokens appended through the gate.
        `own_attention` computes the block's own part where a host needs its exact output (another patch chained
        there, or bit-exact regions); without it the own part comes from the kernel that computes the change.
        `mask` ((B or 1, T, 1)) scales what the reference adds, per token.

        Where `has_lse_attention` (CPU), Attn(Q, [K; K'], [V; V']) − Attn(Q, K, V) is formed from Attn(Q, K, V) and
        Attn(Q, K', V') merged by their log-sum-exp (`merged_attention_change`): the own keys are attended once, not
        again with the reference ones appended (exact in math; 1e-6 apart in float32). Both forms are the same when
        `own_attention` is plain attention; where another patch changes the own part, this one adds the change of
        plain attention to it, the appended form blends towards plain attention."""
        if weight == 0:
            return (own_attention or attention)(q, k, v, heads)
        mix = weight * torch.tanh(self.self_gate.to(q))  # a closed gate adds an exact 0 (and still trains)
        ref = ref.for_batch(q.shape[0])
        ref_key, ref_value = ref.self_key.to(k), ref.self_value.to(v)
        if has_lse_attention(q, k, v, ref_key, ref_value, self.self_gate):
            own_part = attention_with_lse(q, k, v, heads)
            change = merged_attention_change(own_part, attention_with_lse(q, ref_key, ref_value, heads))
            own = rearrange(own_part[0], "b h n d -> b n (h d)") if own_attention is None else own_attention(q, k, v, heads)
        else:
            own = (own_attention or attention)(q, k, v, heads)
            change = attention(q, torch.cat([k, ref_key], dim=1), torch.cat([v, ref_value], dim=1), heads) - own
        added = change.mul_(mix)
        return own + (added if mask is None else added.mul_(mask))

    def cross_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: EAAReferenceKV, heads: int,
        weight: float = 1.0, attention: AttentionFn = sdpa_attention, own_attention: AttentionFn | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block's text cross-attention plus the decoupled attention over the reference features (scaled per token
        by `mask`, (B or 1, T, 1), when given)."""
        text = (own_attention or attention)(q, k, v, heads)
        if weight == 0:
            return text
        ref = ref.for_batch(q.shape[0])
        added = weight * attention(q, ref.cross_key.to(q), ref.cross_value.to(q), heads)
        return text + (added if mask is None else added.mul_(mask))


class EAABlocks(nn.ModuleList):
    """One EAABlock per UNet transformer block, indexed in forward order (docs/DESIGN.md §5)."""

    def __init__(self, layout: UNetLayout, operations: Operations = nn, device=None, dtype=None) -> None:
        super().__init__(EAABlock(c, operations, device=device, dtype=dtype) for c in layout.block_channels)

    def reference_kv(self, features: list[torch.Tensor]) -> list[EAAReferenceKV]:
        if len(features) != len(self):
            raise ValueError(f"expected reference features of {len(self)} blocks, got {len(features)}")
        return [block.reference_kv(f) for block, f in zip(self, features)]
