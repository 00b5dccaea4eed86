"""Checkpoints of a training run: what a killed run needs to go on exactly as if it had never stopped. The step is
the data position (the samples are a pure function of the seed and the step, train/data.py), so a checkpoint is the
adapter, Adam's state, the LR scheduler, every process's RNG states and the step:

    OUTPUT_DIR/checkpoints/step-00000300/
        adapter.safetensors          the adapter as its method's weights file (what `export` converts)
        optimizer.pt                 Adam's state dict, read back with torch.load(weights_only=True): never unpickled
        trainer_state.json           step, LR scheduler state, number of processes, the run's settings
        rng-<process>.safetensors    torch CPU (and CUDA) generator states as tensors, python's and numpy's in metadata

A checkpoint is written into a hidden temporary folder and renamed into place once complete, so a `step-*` folder
is always whole; then all but the last `keep` are deleted.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from idadapter_core.errors import IDAdapterError

from .adapter_files import load_adapter_file, save_adapter_file

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng-{}.safetensors"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(IDAdapterError):
    """A checkpoint is missing, incomplete, or does not fit the run resuming from it."""


@dataclass
class TrainerState:
    step: int
    """Optimizer steps done."""
    num_processes: int
    settings: dict
    """The run's resolved settings (FitConfig.to_dict())."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """`resume` is 'latest' (the newest checkpoint in output_dir, None when there is none yet) or a folder."""
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); pass 'latest' or a "
                              f"{CHECKPOINTS_DIR}/step-* folder of a run")
    return path


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's generator states: torch's as tensors, python's and numpy's as JSON metadata."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    metadata = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([name, keys.tolist(), int(position), int(has_gauss), float(cached)]),
    }
    return tensors, metadata


def restore_rng_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, adapter: nn.Module, optimizer: torch.optim.Optimizer,
    lr_scheduler, settings: dict, keep: int = 0,
) -> Path:
    """Write checkpoint `step` (every process calls this; each adds its RNG states), then delete all but the last
    `keep` (0 keeps all). Returns the checkpoint folder."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    final = folder / checkpoint_name(step)
    temporary = folder / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tensors, metadata = capture_rng_state()
    save_file(tensors, str(temporary / RNG_FILE.format(accelerator.process_index)), metadata=metadata)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter_file(temporary / ADAPTER_FILE, adapter)
        torch.save(optimizer.state_dict(), temporary / OPTIMIZER_FILE)
        state = {"step": step, "num_processes": accelerator.num_processes, "lr_scheduler": lr_scheduler.state_dict(),
                 "settings": settings}
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if final.exists():  # a rerun over an existing step: swap, never leave the name empty of a whole checkpoint
            stale = folder / f".{final.name}.old"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            temporary.rename(final)
            shutil.rmtree(stale)
        else:
            temporary.rename(final)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: str | Path) -> TrainerState:
    state_path = Path(path) / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no {STATE_FILE})")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    return TrainerState(int(state["step"]), int(state["num_processes"]), dict(state["settings"]))


def load_checkpoint(
    accelerator, path: str | Path, adapter: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler,
) -> TrainerState:
    """Restore the adapter, Adam, the LR scheduler and this process's RNG states from checkpoint `path`."""
    path = Path(path)
    trainer_state = read_trainer_state(path)
    if trainer_state.num_processes != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {trainer_state.num_processes} processes, this run has {accelerator.num_processes}: "
            "each process's random state and samples depend on the process count; resume with the same count"
        )
    loaded = load_adapter_file(path / ADAPTER_FILE, require_known_base=False)
    if loaded.config != adapter.config:
        raise CheckpointError(
            f"{path / ADAPTER_FILE} is an adapter for other settings ({loaded.config.to_json()}) than this run's "
            f"({adapter.config.to_json()}); resume with the settings it was trained with"
        )
    adapter.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["lr_scheduler"])
    rng_path = path / RNG_FILE.format(accelerator.process_index)
    if not rng_path.is_file():
        raise CheckpointError(f"{path} has no random state for process {accelerator.process_index} ({rng_path.name})")
    from safetensors import safe_open

    with safe_open(str(rng_path), framework="pt") as f:
        metadata = f.metadata()
    restore_rng_state(load_file(str(rng_path)), metadata)
    return trainer_state
