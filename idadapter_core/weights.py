"""The weights container every file format of the pack shares: one `.safetensors` file whose metadata says what
it is for (`format`, `format_version`, ...; docs/DESIGN.md, "Weights format"). Each method's own file formats
(`idadapter/files.py`, ...) build on `read_weights` / `write_weights` / `check_state_dict`.

Reading never unpickles anything: the header is checked by hand before safetensors parses the file, so a
pickle, a PyTorch zip checkpoint or a truncated download gets a message that says so; a tensor holding NaN or
infinity is refused by name. Writes go to a
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

from torch import nn

from .errors import IncompatibleWeightsError, WeightsFormatError
from .presets import UNetLayout, check_layout

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
                "when loaded); use the .safetensors release of these weights (for weights you trained, "
                "`python -m train export` writes one)."
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


def _check_finite(file_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """NaN or infinity in any weight makes every image black without a word: refuse the file, naming the tensor."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsFormatError(
                f"{file_name} has NaN or infinite values in tensor '{name}'; the file is damaged or was exported from "
                "a training run that diverged. Download it again, or export a checkpoint from before the divergence."
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
    _check_finite(path.name, tensors)
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


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of the file (first 16 hex digits): ties ID embeds to the weights that encoded them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def check_state_dict(skeleton: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors that do not fit `skeleton` (a module built from the file's own configuration, usually on the
    meta device): missing, unexpected or wrongly shaped tensors are named in the message."""
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
        raise IncompatibleWeightsError(f"{source} does not match its own configuration: {'; '.join(details)}.")


def load_adapter(
    path: str | os.PathLike, file_format: str, config_type, module_type: type[nn.Module], method: str,
    model_layout: UNetLayout | None = None, device=None, dtype=None, operations=None, require_known_base: bool = True,
) -> nn.Module:
    """Read, validate and build an adapter of either method: the file's format and version, its own configuration
    (`config_type.from_json` of the `config` metadata, with a `layout`), its base against `model_layout` (the UNet it
    will be applied to, if known) and every tensor against the modules that configuration builds."""
    name = Path(path).name
    tensors, metadata = read_weights(path, file_format)
    try:
        config = config_type.from_json(metadata["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsFormatError(f"{name} has unreadable configuration metadata ({exc}); export it again.") from None
    if metadata.get("base") != config.layout.base:
        raise WeightsFormatError(f"{name} metadata disagrees with itself (base '{metadata.get('base')}' vs '{config.layout.base}').")
    check_layout(config.layout, model_layout, name, method=method, require_known_base=require_known_base)
    kwargs = {} if operations is None else {"operations": operations}
    with torch.device("meta"):
        model = module_type(config, **kwargs)
    check_state_dict(model, tensors, name)
    model.load_state_dict(tensors, assign=True)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def adapter_metadata(file_format: str, layout: UNetLayout, config_json: str, **details: str) -> dict[str, str]:
    """The metadata every adapter file carries (what it is, which UNet it is for, the config that rebuilds it), plus
    the method's own `details`."""
    return {
        "format": file_format,
        "format_version": str(FORMAT_VERSION),
        "base": layout.base,
        "context_dim": str(layout.context_dim),
        "block_channels": json.dumps(list(layout.block_channels)),
        **details,
        "config": config_json,
    }


def save_adapter(path: str | os.PathLike, module: nn.Module, metadata: dict[str, str], dtype: torch.dtype | None = None) -> None:
    """Write an adapter's state dict (cast to `dtype` if given) with its metadata, atomically."""
    tensors = module.state_dict()
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    write_weights(path, tensors, metadata)
