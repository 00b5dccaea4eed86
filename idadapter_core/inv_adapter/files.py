"""Inv-Adapter's weights file (`format: inv-adapter`) on the shared safetensors container, with the same validation
and refusals as IDAdapter's (docs/DESIGN.md §5)."""
from __future__ import annotations

import json
import os

import torch

from ..presets import UNetLayout
from ..weights import FORMAT_VERSION, load_adapter, write_weights
from .model import InvAdapter, InvAdapterConfig

INV_ADAPTER_FORMAT = "inv-adapter"


def inv_adapter_metadata(config: InvAdapterConfig) -> dict[str, str]:
    layout = config.layout
    return {
        "format": INV_ADAPTER_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "base": layout.base,
        "context_dim": str(layout.context_dim),
        "block_channels": json.dumps(list(layout.block_channels)),
        "feature_source": config.feature_source,
        "config": config.to_json(),
    }


def save_inv_adapter(path: str | os.PathLike, model: InvAdapter, dtype: torch.dtype | None = None) -> None:
    tensors = model.state_dict()
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    write_weights(path, tensors, inv_adapter_metadata(model.config))


def load_inv_adapter(
    path: str | os.PathLike, model_layout: UNetLayout | None = None, device=None, dtype=None, operations=None,
    require_known_base: bool = True,
) -> InvAdapter:
    """Load and validate Inv-Adapter weights; `model_layout` is the UNet they will be applied to, if known."""
    return load_adapter(
        path, INV_ADAPTER_FORMAT, InvAdapterConfig, InvAdapter, "Inv-Adapter", model_layout, device, dtype, operations,
        require_known_base,
    )
