"""Either method's adapter file, chosen by the module's type when saving and by the file's `format` when loading, so
checkpoints and export handle IDAdapter and Inv-Adapter alike."""
from __future__ import annotations

import os

import torch
from safetensors import safe_open
from torch import nn

from idadapter_core.errors import WeightsFormatError
from idadapter_core.idadapter import IDAdapter, load_idadapter, save_idadapter
from idadapter_core.idadapter.files import IDADAPTER_FORMAT
from idadapter_core.inv_adapter import INV_ADAPTER_FORMAT, InvAdapter, load_inv_adapter, save_inv_adapter

LOADERS = {IDADAPTER_FORMAT: load_idadapter, INV_ADAPTER_FORMAT: load_inv_adapter}


def save_adapter_file(path: str | os.PathLike, adapter: nn.Module, dtype: torch.dtype | None = None) -> None:
    if isinstance(adapter, InvAdapter):
        save_inv_adapter(path, adapter, dtype)
    elif isinstance(adapter, IDAdapter):
        save_idadapter(path, adapter, dtype)
    else:
        raise TypeError(f"not an adapter of this pack: {type(adapter).__name__}")


def adapter_format(path: str | os.PathLike) -> str:
    """The `format` a weights file says it has (the loaders check everything else)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = (f.metadata() or {}).get("format", "")
    except Exception as err:  # not safetensors: the method's loader explains what it is
        raise WeightsFormatError(f"{os.fspath(path)} could not be read as safetensors ({err})") from None
    if found not in LOADERS:
        raise WeightsFormatError(f"{os.fspath(path)} is not an adapter file (format '{found}'; expected one of "
                                 f"{', '.join(LOADERS)})")
    return found


def load_adapter_file(path: str | os.PathLike, **kwargs) -> nn.Module:
    return LOADERS[adapter_format(path)](path, **kwargs)
