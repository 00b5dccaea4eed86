"""A tiny prepared cache for the trainer's tests: nothing is downloaded. The tiny model folders themselves are built by
the package (train/tiny_models.py, train/tiny_face_models.py), which the demo uses too.

- `write_tiny_cache`: identities of red-square "faces" through `train.prepare`'s own code with the tiny insightface
  pack: alice 3 images, bob 2, carol 1, 2 augmented copies each.
- `write_fit_workspace` (conftest's `workspace` fixture): that cache and the tiny models a fit reads; `settings`: a
  tiny fit's settings on it; `forget_accelerate_state` before each run in the same process.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from train.tiny_face_models import square_faces_image, write_model_pack

FACE_PACK = "tiny_pack"
FACE_DIM = 64


IDENTITIES = {"alice": 3, "bob": 2, "carol": 1}


def write_tiny_cache(root: Path) -> tuple[Path, Path]:
    """(insightface root, cache folder): the tiny face pack, and a cache prepared from red-square identities with
    captions, 2 augmented copies per image."""
    from idadapter_core.face import load_face_analyzer
    from train.prepare import prepare_dataset

    pack_root = root / "insightface"
    write_model_pack(pack_root, FACE_PACK, embed_dim=FACE_DIM)
    source = root / "identities"
    seed = 0
    for identity, count in IDENTITIES.items():
        (source / identity).mkdir(parents=True)
        for i in range(count):
            seed += 1
            path = source / identity / f"{i}.png"
            Image.fromarray(square_faces_image((320, 320), [(160, 160, 128)], seed=seed)).save(path)
            path.with_suffix(".txt").write_text(f"a portrait photo of a {'woman' if i % 2 else 'man'} smiling outdoors")
    analyzer = load_face_analyzer(pack_root, FACE_PACK, "CPU", det_size=320)
    cache = root / "cache"
    prepare_dataset(source, cache, analyzer, min_images=1, augmentations=2)
    return pack_root, cache


def write_fit_workspace(root: Path) -> dict[str, Path]:
    """The tiny cache (`write_tiny_cache`), a CLIP vision model and SD1.5, SD2.1-v and SDXL-shaped pipelines under
    `root`."""
    from train.tiny_models import write_tiny_clip_vision, write_tiny_pipeline

    pack_root, cache = write_tiny_cache(root)
    return {
        "root": root, "cache": cache, "insightface": pack_root, "clip": write_tiny_clip_vision(root / "clip"),
        "sd15": write_tiny_pipeline(root / "sd15"), "v": write_tiny_pipeline(root / "sd21v", "v"),
        "sdxl": write_tiny_pipeline(root / "sdxl", "sdxl"),
    }


def settings(ws: dict[str, Path], out: str, **overrides) -> dict:
    """A deterministic 6-step IDAdapter fit of the workspace `ws` (`write_fit_workspace`) into `ws["root"] / out`."""
    from train.tiny_models import RESOLUTION

    values = dict(
        cache=str(ws["cache"]), output_dir=str(ws["root"] / out), pretrained=str(ws["sd15"]), clip_vision=str(ws["clip"]),
        insightface_root=str(ws["insightface"]), face_det_size=64, num_refs=2, mff_width=16, mff_heads=2,
        batch_size=2, max_steps=6, checkpoint_every=2, keep_checkpoints=0, resolution=RESOLUTION, lr=1e-3,
        identity_dropout=0.3, deterministic=True, log_with="none",
    )
    values.update(overrides)
    return values


def forget_accelerate_state() -> None:
    """accelerate keeps its settings in process-wide singletons, which a second run in the process must not inherit."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
