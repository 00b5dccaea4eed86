"""A synthetic world of identities whose identity is in the pixels and in made-up face embeddings, and its prepared
cache written directly (no face model runs): what bench/identity_learning.py trains and evaluates on, and
bench/train_throughput.py times the trainer's step with. (train/miniature.py is the other synthetic world: people of
visible attributes that go through `prepare` and are read out of generated images; train/tiny_face_models.py draws
the red-square "faces" its tiny detector finds.)

Every identity is a striped disc ("face") with its own two colours, stripe angle and stripe offset, and its own
ArcFace embedding. A target image shows the disc near the centre at about the same size (as in an aligned face data
set such as CelebA-HQ) on a random grey background; the 224 px CLIP crops show the disc centred and large, as aligned
face crops do; angle, offset and brightness are jittered per image; the ArcFace embeddings are the identity's unit
vector plus noise (cosine about 0.8 within an identity, about 0 across). Every caption is the same (`CAPTION`), so
the references are the only carrier of identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from idadapter_core.face import CLIP_CROP_SIZE

from .cache import SHARD_PATTERN, CacheRecord, cache_settings, save_arrays, write_cache
from .prepare import PrepareReport

CAPTION = "a photo of a person"
"""The plain caption: no identity named."""
CLASS_WORD = "person"
FACE_MODEL = "synthetic"
"""The face model name recorded in the synthetic cache (no recognizer runs: the embeddings are made up)."""


@dataclass(frozen=True)
class SyntheticIdentity:
    name: str
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    angle: float
    """Stripe direction (radians)."""
    phase: float
    """Stripe offset (fraction of a period)."""
    embedding: np.ndarray
    """Unit vector: the identity's ArcFace embedding before per-image noise."""


def make_identities(count: int, face_dim: int, rng: np.random.Generator) -> list[SyntheticIdentity]:
    """Identities with hues spread around the colour wheel (a random offset), a second colour of another hue, and a
    random stripe angle: every identity looks different from every other."""
    import colorsys

    offset = rng.random()
    identities = []
    for index in range(count):
        hue = (offset + index / count) % 1.0
        second = (hue + 0.25 + 0.5 * rng.random()) % 1.0
        colours = tuple(tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)) for h in (hue, second))
        embedding = rng.standard_normal(face_dim)
        angle, phase = float(rng.uniform(0, math.pi)), float(rng.random())
        identities.append(SyntheticIdentity(f"id{index:02d}", colours, angle, phase,
                                            (embedding / np.linalg.norm(embedding)).astype(np.float32)))
    return identities


def render_face(identity: SyntheticIdentity, size: int, centre: tuple[float, float], radius: float,
                background: np.ndarray, rng: np.random.Generator, stripes: float = 3.0) -> np.ndarray:
    """(size, size, 3) uint8: a disc with the identity's two-colour stripes (`stripes` periods across it; angle and
    offset jittered a little, brightness by a few percent) on a flat background."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    angle = identity.angle + rng.normal(0.0, 0.08)
    phase = (dx * math.cos(angle) + dy * math.sin(angle)) / (2 * radius) * stripes
    stripe = (np.floor(phase + identity.phase + rng.normal(0.0, 0.05)) % 2).astype(bool)
    brightness = rng.uniform(0.9, 1.1)
    colours = np.clip(np.array(identity.colours, np.float32) * brightness, 0, 255)
    image = np.broadcast_to(background.astype(np.float32), (size, size, 3)).copy()
    inside = dx**2 + dy**2 <= radius**2
    image[inside & stripe] = colours[0]
    image[inside & ~stripe] = colours[1]
    return image.round().astype(np.uint8)


def random_background(rng: np.random.Generator) -> np.ndarray:
    return np.full(3, rng.uniform(60, 200), np.float32) + rng.normal(0, 8, 3)


def render_target(identity: SyntheticIdentity, size: int, rng: np.random.Generator) -> np.ndarray:
    """A target image: the face near the centre at about the same size (as in an aligned face data set like
    CelebA-HQ), on a random background."""
    centre = tuple(size / 2 + rng.normal(0, size * 0.04, 2))
    return render_face(identity, size, centre, size * rng.uniform(0.36, 0.44), random_background(rng), rng)


def render_face_crop(identity: SyntheticIdentity, rng: np.random.Generator) -> np.ndarray:
    """A CLIP crop: the face centred and large, as aligned crops are."""
    size = CLIP_CROP_SIZE
    centre = tuple(size / 2 + rng.normal(0, 4, 2))
    return render_face(identity, size, centre, size * rng.uniform(0.36, 0.42), random_background(rng), rng)


def face_embedding(identity: SyntheticIdentity, rng: np.random.Generator, noise: float = 0.5) -> np.ndarray:
    """The identity's unit vector plus isotropic noise of norm about `noise`, L2-normalised (as ArcFace's are)."""
    dim = len(identity.embedding)
    vector = identity.embedding + rng.standard_normal(dim) * noise / math.sqrt(dim)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


@dataclass(frozen=True)
class SyntheticImage:
    identity: str
    path: Path
    """The target image file."""
    clip_crop: np.ndarray
    """(224, 224, 3) uint8."""
    arcface: np.ndarray
    """(D,) float32, unit norm."""


def make_images(identities: list[SyntheticIdentity], per_identity: int, folder: Path, resolution: int,
                rng: np.random.Generator, image_scale: int = 1) -> dict[str, list[SyntheticImage]]:
    """`per_identity` images of each identity: the target image (written as PNG, `image_scale` times the training
    resolution, so loading resizes it as it would a photo), its face crop and its face embedding."""
    images: dict[str, list[SyntheticImage]] = {}
    for identity in identities:
        (folder / identity.name).mkdir(parents=True, exist_ok=True)
        images[identity.name] = []
        for index in range(per_identity):
            path = folder / identity.name / f"{index:03d}.png"
            Image.fromarray(render_target(identity, resolution * image_scale, rng)).save(path)
            images[identity.name].append(SyntheticImage(identity.name, path, render_face_crop(identity, rng),
                                                        face_embedding(identity, rng)))
    return images


def write_synthetic_cache(folder: Path, images: list[SyntheticImage], face_dim: int,
                          face_model: str = FACE_MODEL) -> Path:
    """A finished training cache (train/cache.py's format, one shard, no augmented copies) holding `images` in order,
    as `python -m train prepare` would write it after analysing them."""
    shard = SHARD_PATTERN.format(0)
    save_arrays(folder / shard, {
        "arcface": np.stack([image.arcface for image in images]),
        "clip_crop": np.stack([image.clip_crop for image in images]),
        "arcface_aug": np.zeros((len(images), 0, face_dim), np.float32),
        "clip_crop_aug": np.zeros((len(images), 0, CLIP_CROP_SIZE, CLIP_CROP_SIZE, 3), np.uint8),
    })
    records = []
    for row, image in enumerate(images):
        size = Image.open(image.path).size[0]
        records.append(CacheRecord(
            row=row, identity=image.identity, image=str(image.path.resolve()), caption=CAPTION, class_word=CLASS_WORD,
            shard=shard, shard_row=row, box=(0.0, 0.0, float(size), float(size)), landmarks=((0.0, 0.0),) * 5,
            faces_in_image=1,
        ))
    settings = cache_settings(face_model, face_dim, det_size=0, min_face_size=0, min_images=1, augmentations=0,
                              seed=0, clip_crop_scale=1.0, source="synthetic", shard_size=len(images),
                              source_fingerprint="synthetic")
    report = PrepareReport(kept_images=len(images), kept_identities=len({image.identity for image in images}),
                           skipped=[], dropped_identities=[])
    write_cache(folder, records, report.to_json(), settings)
    return folder
