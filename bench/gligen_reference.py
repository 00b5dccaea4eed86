"""GLIGEN's own form of the gated self-attention adapter (ComfyUI `comfy/gligen.py`, GatedSelfAttentionDense):
attention over all of [y, E_r], keep y's rows, E_r's projections recomputed on every call. The production
`GatedSelfAttention` computes the same result with queries from y only and E_r's K/V cached; this is the oracle
the tests and `step_overhead.py` compare it against."""
from __future__ import annotations

import torch

from idadapter_core.idadapter import GatedSelfAttention


def gligen_forward(block: GatedSelfAttention, y: torch.Tensor, e_r: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    objs = block.linear(e_r).expand(y.shape[0], -1, -1)
    visual = y.shape[1]
    attended = block.attn(block.norm1(torch.cat([y, objs], dim=1)))[:, :visual]
    y = y + weight * torch.tanh(block.alpha_attn) * attended
    return y + weight * torch.tanh(block.alpha_dense) * block.ff(block.norm2(y))
