"""Inv-Adapter's weights file (`format: inv-adapter`) on the shared safetensors container, with the same validation
and refusals as IDAdapter's (docs/DESIGN.md §5)."""
from __future__ import annotations

import os

import torch

from ..presets import UNetLayout
from ..weights import adapter_metadata, load_adapter, save_adapter
from .model import InvAdapter, InvAdapterConfig

INV_ADAPTER_FORMAT = "inv-adapter"


def inv_adapter_metadata(config: InvAdapterConfig) -> dict[str, str]:
    return adapter_metadata(INV_ADAPTER_FORMAT, config.layout, config.to_json(), feature_source=config.feature_source)


def save_inv_adapter(path: str | os.PathLike, model: InvAdapter, dtype: torch.dtype | None = None) -> None:
    save_adapter(path, model, inv_adapter_metadata(model.config), dtype)


def load_inv_adapter(
    path: str | os.PathLike, model_layout: UNetLayout | None = None, device=None, dtype=None, operations=None,
    require_known_base: bool = True,
) -> InvAdapter:
    """Load and validate Inv-Adapter weights; `model_layout` is the UNet they will be applied to, if known."""
    return load_adapter(
        path, INV_ADAPTER_FORMAT, InvAdapterConfig, InvAdapter, "Inv-Adapter", model_layout, device, dtype, operations,
        require_known_base,
    )
