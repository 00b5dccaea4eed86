"""A tiny prepared cache for the trainer's tests: nothing is downloaded. The tiny model folders themselves are built by
the package (train/tiny_models.py, train/tiny_face_models.py), which the demo uses too.

- `write_tiny_cache`: identities of red-square "faces" through `train.prepare`'s own code with the tiny insightface
  pack: alice 3 images, bob 2, carol 1, 2 augmented copies each.
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
