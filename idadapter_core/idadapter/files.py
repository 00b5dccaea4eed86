"""IDAdapter's two file formats, on the shared safetensors container (`idadapter_core/weights.py`): the adapter
weights (`format: idadapter`) and a saved identity (`format: idadapter-embeds`); docs/DESIGN.md, "Weights format"."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import WeightsFormatError
from ..presets import UNetLayout
from ..weights import FORMAT_VERSION, adapter_metadata, load_adapter, read_weights, save_adapter, write_weights
from .model import IDAdapter, IDAdapterConfig, IdentityEmbeds

IDADAPTER_FORMAT = "idadapter"
EMBEDS_FORMAT = "idadapter-embeds"


def idadapter_metadata(config: IDAdapterConfig) -> dict[str, str]:
    return adapter_metadata(
        IDADAPTER_FORMAT, config.layout, config.to_json(),
        clip_vision=config.clip_vision,
        face_model=config.face_model,
        face_embed_dim=str(config.mff.face_dim),
        num_ref_tokens=str(config.num_ref_tokens),
        num_refs=str(config.num_refs),
        class_word=config.class_word,
        trigger_word=config.trigger_word,
    )


def save_idadapter(path: str | os.PathLike, model: IDAdapter, dtype: torch.dtype | None = None) -> None:
    save_adapter(path, model, idadapter_metadata(model.config), dtype)


def load_idadapter(
    path: str | os.PathLike, model_layout: UNetLayout | None = None, device=None, dtype=None, operations=None,
    require_known_base: bool = True,
) -> IDAdapter:
    """Load and validate IDAdapter weights; `model_layout` is the UNet they will be applied to, if known."""
    return load_adapter(
        path, IDADAPTER_FORMAT, IDAdapterConfig, IDAdapter, "IDAdapter", model_layout, device, dtype, operations,
        require_known_base,
    )


def save_identity_embeds(path: str | os.PathLike, embeds: IdentityEmbeds) -> None:
    tensors = {"reference_tokens": embeds.reference_tokens}
    tensors.update({f"identity_tokens.{key}": value for key, value in embeds.identity_tokens.items()})
    metadata = {
        "format": EMBEDS_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "adapter_fingerprint": embeds.adapter_fingerprint,
        "adapter_name": embeds.adapter_name,
    }
    write_weights(path, tensors, metadata)


def load_identity_embeds(path: str | os.PathLike) -> IdentityEmbeds:
    tensors, metadata = read_weights(path, EMBEDS_FORMAT)
    if "reference_tokens" not in tensors:
        raise WeightsFormatError(f"{Path(path).name} has no reference_tokens tensor; save the ID embeds again.")
    prefix = "identity_tokens."
    return IdentityEmbeds(
        reference_tokens=tensors["reference_tokens"],
        identity_tokens={name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)},
        adapter_fingerprint=metadata.get("adapter_fingerprint", ""),
        adapter_name=metadata.get("adapter_name", ""),
    )
