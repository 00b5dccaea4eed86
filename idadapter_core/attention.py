"""Multi-head attention shared by the MFF encoder and the adapters.

The attention kernel is a parameter: `attention(q, k, v, heads)` on `(batch, tokens, heads*dim)`
tensors, ComfyUI's `optimized_attention` signature, so the ComfyUI host can route the adapters
through its own kernels. The default is PyTorch's SDPA.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class Operations(Protocol):
    """`torch.nn` or ComfyUI's `comfy.ops.manual_cast`: where the Linear and LayerNorm classes come from."""

    Linear: type[nn.Linear]
    LayerNorm: type[nn.LayerNorm]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h n d -> b n (h d)")


def has_lse_attention(*tensors: torch.Tensor) -> bool:
    """Whether `attention_with_lse` serves these tensors: on CPU, where PyTorch's flash-attention kernel (the one
    F.scaled_dot_product_attention runs there) returns each query's log-sum-exp beside the output, and not for
    training (that kernel passes no gradient through the log-sum-exp)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" for t in tensors) and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention on `(batch, tokens, heads*dim)` tensors, as (output `(batch, heads, tokens, dim)`, the
    log-sum-exp of each query's scaled scores `(batch, heads, tokens, 1)`): two attentions over disjoint key sets
    merge exactly by these weights (`merge_attentions`). Only where `has_lse_attention`."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return out, lse.unsqueeze(-1).to(out.dtype)


def merged_attention_change(own: tuple[torch.Tensor, torch.Tensor], extra: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attn(Q, [K; K'], [V; V']) − Attn(Q, K, V) from `attention_with_lse`'s results for (K, V) and (K', V'), as
    `(batch, tokens, heads*dim)`: the softmax over all keys is the two partial ones weighted by their shares of the
    total exp-sum, so the extra keys' share σ(lse' − lse) times (o' − o) is exact, and the own keys are attended once."""
    (own_out, own_lse), (extra_out, extra_lse) = own, extra
    change = torch.sigmoid(extra_lse - own_lse) * (extra_out - own_out)
    return rearrange(change, "b h n d -> b n (h d)")


class MultiHeadAttention(nn.Module):
    """q/k/v projections without bias and an output projection with bias (the SD/GLIGEN layout)."""

    def __init__(self, dim: int, heads: int, operations: Operations = nn, device=None, dtype=None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.to_k = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.to_v = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.to_out = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        return self.to_out(attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))
