"""Inv-Adapter as one module: the EAA of every transformer block, and its configuration (docs/DESIGN.md §3)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..attention import Operations
from ..presets import UNetLayout, get_preset
from .eaa import EAABlocks


@dataclass(frozen=True)
class InvAdapterConfig:
    layout: UNetLayout
    feature_source: str = "norm1"
    """[I] What the reference pass records per block: the self-attention input norm1(h)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "InvAdapterConfig":
        data = json.loads(text)
        layout = UNetLayout.from_json(json.dumps(data.pop("layout")))
        return cls(layout=layout, **data)

    @classmethod
    def for_base(cls, base: str, **overrides) -> "InvAdapterConfig":
        return cls(layout=get_preset(base), **overrides)


class InvAdapter(nn.Module):
    def __init__(self, config: InvAdapterConfig, operations: Operations = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.blocks = EAABlocks(config.layout, operations, device=device, dtype=dtype)


def count_inv_adapter_parameters(config: InvAdapterConfig) -> int:
    """Trainable parameters, counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in InvAdapter(config).parameters())
