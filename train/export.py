"""Export a training checkpoint as the weights file that ComfyUI's Load IDAdapter (or Load Inv-Adapter) node loads.

    python -m train export RUN_DIR/checkpoints/step-00050000 --out idadapter-sd21.safetensors --dtype fp16
    python -m train export RUN_DIR --dtype fp16          (the run's newest checkpoint, written beside its checkpoints)

A checkpoint's adapter file already has the release layout (its method's weights file; IDAdapter's cross-attention
K/V are stored as differences from the training base). Export casts it to --dtype, writes it atomically, and reads it back with
the method's loader: every tensor must equal the checkpoint's cast to that dtype, and the metadata must name the same
base and configuration, or the file is deleted and the export fails.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from idadapter_core.errors import IDAdapterError

from .adapter_files import adapter_format, load_adapter_file, save_adapter_file
from .checkpoints import ADAPTER_FILE, list_checkpoints, read_trainer_state

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ExportError(IDAdapterError):
    """The checkpoint cannot be exported, or the exported file does not read back as written."""


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint folder as given, or the newest checkpoint of a run folder."""
    source = Path(source)
    if (source / ADAPTER_FILE).is_file():
        return source
    checkpoints = list_checkpoints(source)
    if not checkpoints:
        raise ExportError(f"{source} is neither a checkpoint folder (no {ADAPTER_FILE}) nor a run folder with "
                          "checkpoints/step-*; pass one of those")
    return checkpoints[-1]


def export_checkpoint(source: str | Path, out: str | Path | None = None, dtype: str = "fp16") -> Path:
    """Write the checkpoint's adapter as the weights file its Load node reads, in `dtype`; returns its path."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    checkpoint = resolve_checkpoint(source)
    adapter = load_adapter_file(checkpoint / ADAPTER_FILE, require_known_base=False)
    step = read_trainer_state(checkpoint).step
    if out is None:
        method = adapter_format(checkpoint / ADAPTER_FILE)
        out = checkpoint.parent.parent / f"{method}-{adapter.config.layout.base}-step{step}-{dtype}.safetensors"
    out = Path(out)
    save_adapter_file(out, adapter, dtype=DTYPES[dtype])
    try:
        verify_export(out, adapter.state_dict(), adapter.config, DTYPES[dtype])
    except ExportError:
        out.unlink(missing_ok=True)
        raise
    log.info("exported %s (step %d, %s, %s) to %s (%.1f MB)", checkpoint.name, step, adapter.config.layout.describe(),
             dtype, out, out.stat().st_size / 1e6)
    return out


def verify_export(path: Path, expected: dict[str, torch.Tensor], config, dtype: torch.dtype) -> None:
    """Read `path` back as the node does and compare it with the checkpoint's tensors cast to `dtype`."""
    reloaded = load_adapter_file(path, require_known_base=False)
    if reloaded.config != config:
        raise ExportError(f"{path.name} reads back with another configuration than the checkpoint's")
    with safe_open(str(path), framework="pt") as f:
        base = (f.metadata() or {}).get("base")
    if base != config.layout.base:
        raise ExportError(f"{path.name} names base '{base}', the checkpoint '{config.layout.base}'")
    tensors = reloaded.state_dict()
    for name, tensor in expected.items():
        if tensors[name].dtype != dtype or not torch.equal(tensors[name], tensor.to(dtype)):
            raise ExportError(f"{path.name}: tensor {name} does not read back as written")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="a checkpoints/step-* folder, or a run folder (its newest checkpoint)")
    parser.add_argument("--out", type=Path, help="the weights file to write (default: beside the run's checkpoints)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="tensor type of the file (default fp16)")


def run(args: argparse.Namespace) -> Path:
    return export_checkpoint(args.checkpoint, args.out, args.dtype)
