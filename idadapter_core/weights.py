"""Adapter weights: one `.safetensors` file with metadata saying what it is for (DESIGN.md, "weights format").

Reading never unpickles anything: the header is checked by hand before safetensors parses the file, so a
pickle, a PyTorch zip checkpoint or a truncated download gets a message that says so. Writes go to a
temporary file in the target folder and are renamed into place, so a file is never left half written.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import IncompatibleWeightsError, WeightsFormatError
from .model import IDAdapter, IDAdapterConfig, IdentityEmbeds
from .presets import PRESETS, UNetLayout

IDADAPTER_FORMAT = "idadapter"
EMBEDS_FORMAT = "idadapter-embeds"
FORMAT_VERSION = 1
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(temp_path)` and move the result onto `path` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata)))


def _check_safetensors_container(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if head[:1] == b"\x80" or head[:2] == b"PK":
            kind = "a PyTorch zip checkpoint" if head[:2] == b"PK" else "a Python pickle"
            raise WeightsFormatError(
                f"{path.name} is {kind}, not safetensors. This pack only loads .safetensors files (pickles can run code "
                "when loaded); use the .safetensors release of these weights or convert them with the trainer's export."
            )
        if len(head) < 8:
            raise WeightsFormatError(f"{path.name} is empty or truncated ({size} bytes); download or export it again.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES:
            raise WeightsFormatError(f"{path.name} is not a safetensors file (its first bytes are not a safetensors header).")
        if 8 + header_len > size:
            raise WeightsFormatError(
                f"{path.name} is truncated: its header needs {8 + header_len} bytes, the file has {size}; download or export it again."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightsFormatError(f"{path.name} is not a safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise WeightsFormatError(f"{path.name} is not a safetensors file (its header is not a JSON object).")
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    expected = 8 + header_len + data_end
    if expected > size:
        raise WeightsFormatError(
            f"{path.name} is truncated: expected {expected} bytes, found {size}; download or export it again."
        )


def read_weights(path: str | os.PathLike, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a weights file of `expected_format`, or a WeightsFormatError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFormatError(f"weights file not found: {path}")
    _check_safetensors_container(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsFormatError(f"{path.name} could not be read as safetensors ({exc}); download or export it again.") from None
    found = metadata.get("format")
    if found != expected_format:
        what = f"a '{found}' file" if found else "a safetensors file without adapter metadata (another model's weights?)"
        raise WeightsFormatError(f"{path.name} is {what}; expected '{expected_format}' weights.")
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise WeightsFormatError(
            f"{path.name} has format_version '{version}'; this pack reads versions up to {FORMAT_VERSION}. Update the pack."
        )
    return tensors, metadata


def idadapter_metadata(config: IDAdapterConfig) -> dict[str, str]:
    layout = config.layout
    return {
        "format": IDADAPTER_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "base": layout.base,
        "context_dim": str(layout.context_dim),
        "block_channels": json.dumps(list(layout.block_channels)),
        "clip_vision": config.clip_vision,
        "face_model": config.face_model,
        "face_embed_dim": str(config.mff.face_dim),
        "num_ref_tokens": str(config.num_ref_tokens),
        "num_refs": str(config.num_refs),
        "class_word": config.class_word,
        "trigger_word": config.trigger_word,
        "config": config.to_json(),
    }


def save_idadapter(path: str | os.PathLike, model: IDAdapter, dtype: torch.dtype | None = None) -> None:
    tensors = model.state_dict()
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    write_weights(path, tensors, idadapter_metadata(model.config))


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of the file (first 16 hex digits): ties ID embeds to the weights that encoded them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def check_layout(
    config: IDAdapterConfig, model_layout: UNetLayout | None, source: str, require_known_base: bool = True
) -> None:
    """Refuse weights whose UNet layout differs from the model's (or, without a model, from their preset).
    With `require_known_base=False` a base without a preset passes here, to be checked once the model is known."""
    weights_layout = config.layout
    if model_layout is None:
        preset = PRESETS.get(weights_layout.base)
        if preset is None:
            if not require_known_base:
                return
            raise IncompatibleWeightsError(
                f"{source} is for an unknown base '{weights_layout.base}'; known bases: {', '.join(PRESETS)}. "
                "Pass the model it is meant for to validate it."
            )
        if not preset.same_shape_as(weights_layout):
            raise IncompatibleWeightsError(
                f"{source} says base '{weights_layout.base}' but its blocks do not match that preset "
                f"(file: {weights_layout.describe()}, preset: {preset.describe()})."
            )
        return
    if not weights_layout.same_shape_as(model_layout):
        raise IncompatibleWeightsError(
            f"{source} is for {weights_layout.describe()}, but the model is {model_layout.describe()}; "
            f"use IDAdapter weights trained for {model_layout.base}."
        )


def load_idadapter(
    path: str | os.PathLike, model_layout: UNetLayout | None = None, device=None, dtype=None, operations=None,
    require_known_base: bool = True,
) -> IDAdapter:
    """Load and validate IDAdapter weights; `model_layout` is the UNet they will be applied to, if known."""
    name = Path(path).name
    tensors, metadata = read_weights(path, IDADAPTER_FORMAT)
    try:
        config = IDAdapterConfig.from_json(metadata["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsFormatError(f"{name} has unreadable configuration metadata ({exc}); export it again.") from None
    if metadata.get("base") != config.layout.base:
        raise WeightsFormatError(f"{name} metadata disagrees with itself (base '{metadata.get('base')}' vs '{config.layout.base}').")
    check_layout(config, model_layout, name, require_known_base)
    kwargs = {} if operations is None else {"operations": operations}
    with torch.device("meta"):
        skeleton = IDAdapter(config, **kwargs)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            details.append(f"wrong shape for {wrong[0]}: expected {expected[wrong[0]]}, found {found[wrong[0]]}")
        raise IncompatibleWeightsError(f"{name} does not match its own configuration: {'; '.join(details)}.")
    model = IDAdapter(config, **kwargs, device="meta")
    model.load_state_dict(tensors, assign=True)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


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
