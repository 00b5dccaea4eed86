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
