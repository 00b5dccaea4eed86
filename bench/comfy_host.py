"""ComfyUI as the host of a benchmark: started from COMFYUI_PATH in CPU mode, the pack imported as ComfyUI imports a
custom-node package."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from bench.common import REPO_ROOT, SD15_COMFY_UNET


def start_comfyui(*flags: str) -> None:
    """Put ComfyUI on sys.path and set its CPU mode and the given boolean command-line `flags` (e.g.
    `use_pytorch_cross_attention`) before `comfy.model_management` reads them."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        raise SystemExit("--host needs COMFYUI_PATH pointing at a ComfyUI checkout")
    sys.path.insert(0, root)
    from comfy.cli_args import args

    args.cpu = True
    for flag in flags:
        setattr(args, flag, True)
    import comfy.model_management  # noqa: F401  (reads the arguments above)


def import_pack(path: Path = REPO_ROOT, module: str = "comfyui_idadapter") -> ModuleType:
    """A checkout of the pack loaded the way ComfyUI loads custom nodes, under the package name `module`."""
    spec = importlib.util.spec_from_file_location(module, path / "__init__.py", submodule_search_locations=[str(path)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[module] = pack
    spec.loader.exec_module(pack)
    return pack


def random_sd15_unet(image_size: int = 32, seed: int = 0):
    """ComfyUI's own SD1.5 `UNetModel` (eval) with finite random weights: N(0, 0.02) matrices, norm scales 1, the
    other vectors 0. Call after `start_comfyui`."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(**dict(SD15_COMFY_UNET, image_size=image_size), operations=comfy.ops.disable_weight_init)
    return fill_random(unet).eval()


def fill_random(module: torch.nn.Module) -> torch.nn.Module:
    """Finite random weights for a module built with ComfyUI's uninitialised ops: N(0, 0.02) matrices, norm scales 1,
    the other vectors 0 (from torch's global generator)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(std=0.02)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    return module
