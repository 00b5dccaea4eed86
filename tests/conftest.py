"""Tiny models built in code: no downloads, CPU, seconds. The fixtures every test module shares live here (the models
and data they build: comfy_fixtures.py, train_fixtures.py); no test module imports another.

`one_thread` and `no_downloads` are module-wide and opt-in, so that they also cover the module fixtures (shared runs)
of a module that asks for them and no other module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_assets_folder() -> Path:
    """`shared/assets` beside the repository, or, in a linked git worktree (whose `.git` is a file naming
    `<main checkout>/.git/worktrees/<name>`), beside its main checkout."""
    beside = REPO_ROOT.parent / "shared" / "assets"
    git = REPO_ROOT / ".git"
    if beside.is_dir() or not git.is_file() or not git.read_text().startswith("gitdir:"):
        return beside
    main_checkout = Path(git.read_text().removeprefix("gitdir:").strip()).parents[2]
    beside_main = main_checkout.parent / "shared" / "assets"
    return beside_main if beside_main.is_dir() else beside


SHARED_ASSETS = shared_assets_folder()
PACK_MODULE = "comfyui_idadapter"
# Appended, not prepended: the pack's `nodes/` package must never shadow ComfyUI's own `nodes` module.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig  # noqa: E402
from train.tiny_models import tiny_unet_config  # noqa: E402,F401  (tests import it from here)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny models run fastest on one thread, and do not stall when other jobs share
    the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def no_downloads():
    """Every model comes from a local folder: a download attempt (Hugging Face or insightface) fails the test."""
    import huggingface_hub.file_download
    import insightface.utils.storage

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.file_download, "http_get", refuse)
        patch.setattr(insightface.utils.storage, "download_file", refuse)
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """The trainer's tiny world, once per module: a prepared cache, its insightface pack, a CLIP vision model and SD1.5,
    SD2.1-v and SDXL-shaped pipelines (train_fixtures.settings turns it into a fit's settings)."""
    from train_fixtures import write_fit_workspace

    return write_fit_workspace(tmp_path_factory.mktemp("fit"))


@pytest.fixture
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


TINY_MFF = MFFConfig(clip_dim=16, face_dim=8, num_patches=4, width=20, depth=2, heads=4)


def tiny_config(layout, **overrides) -> IDAdapterConfig:
    kwargs = dict(mff=TINY_MFF, clip_embed_dim=12, num_refs=2, clip_vision="tiny-test", face_model="tiny-test")
    kwargs.update(overrides)
    return IDAdapterConfig(layout=layout, **kwargs)


def tiny_adapter(layout, seed: int = 0, open_gates: bool = False, **overrides) -> IDAdapter:
    torch.manual_seed(seed)
    adapter = IDAdapter(tiny_config(layout, **overrides))
    if open_gates:
        with torch.no_grad():
            for block in adapter.blocks:
                block.alpha_attn.fill_(0.7)
                block.alpha_dense.fill_(-0.4)
    return adapter


def tiny_features(config: IDAdapterConfig, batch: int = 1, num_refs: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = num_refs or config.num_refs
    mff = config.mff
    return (
        torch.randn(batch, n, mff.num_patches, mff.clip_dim, generator=g),
        torch.nn.functional.normalize(torch.randn(batch, n, mff.face_dim, generator=g), dim=-1),
        torch.randn(batch, n, config.clip_embed_dim, generator=g),
    )


def shared_assets_or_skip() -> Path:
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"real test assets not found at {SHARED_ASSETS} (they sit beside the repo in CI, not in a user's clone)")
    return SHARED_ASSETS


def comfyui_path_or_skip() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the host integration tests")
    if not (Path(path) / "comfy").is_dir():
        pytest.skip(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/ folder)")
    return Path(path)


def load_comfyui_and_pack() -> ModuleType:
    """Import ComfyUI from COMFYUI_PATH in CPU mode, then this pack the way ComfyUI loads custom nodes
    (a package from the repo's `__init__.py`, so the nodes' relative imports resolve). Returns the pack."""
    root = str(comfyui_path_or_skip())
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu on import)

    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = pack
    spec.loader.exec_module(pack)
    importlib.import_module(f"{PACK_MODULE}.nodes")
    return pack


@pytest.fixture(scope="session")
def comfy_pack() -> ModuleType:
    return load_comfyui_and_pack()
