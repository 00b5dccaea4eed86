"""Prepare a dataset: a folder of identities or a JSONL manifest -> the training cache that `fit` reads.

For every image: the largest face, found and aligned exactly as the ComfyUI nodes do (`idadapter_core.face`), its
ArcFace embedding and 224x224 CLIP crop, and `--augmentations` seeded augmented copies (flip, small rotation,
colour jitter: the paper's enrichment of identities with few images, DESIGN.md §2.2, §2.6), each with its own
embedding and crop, so training never runs the frozen face models. Unreadable images and images without a large
enough face are skipped, identities left with fewer than `--min-images` images are dropped, and report.json
says which and why. The cache layout is described in train/cache.py.

Resuming (our design). The work is done in two steps:
1. The images, in their fixed (identity, file name) order, are analysed in chunks of `work_chunk_size`; each chunk
   is one file in CACHE/work/, written atomically. A killed run loses at most the chunk in progress; a re-run
   analyses only the chunks that are missing.
2. With every chunk there, identities are filtered and the shards, index.jsonl, report.json and last prepare.json
   (the mark of a finished cache) are written, each atomically; then work/ is removed.
Every output depends only on the inputs and the settings (augmentations are seeded per image), so a run that was
killed and re-run writes the same bytes as one that was not.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from idadapter_core.errors import IDAdapterError
from idadapter_core.face import (
    CLIP_CROP_SCALE, CLIP_CROP_SIZE, PROVIDERS, Augmentation, DetectedFace, FaceAnalyzer,
    align_reference, detect_face, load_face_analyzer, load_image, to_rgb_uint8,
)

from .cache import (
    INDEX_FILE, REPORT_FILE, SETTINGS_FILE, SHARD_KEYS, SHARD_PATTERN, WORK_DIR, CacheError, CacheRecord,
    cache_settings, save_arrays, write_cache, write_text_atomic,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
WORK_PLAN_FILE = "plan.json"
WORK_CHUNK_PATTERN = "chunk-{:05d}.safetensors"


class PrepareError(IDAdapterError):
    """The dataset or the settings given to `prepare` cannot be used."""


@dataclass(frozen=True)
class SourceImage:
    identity: str
    path: Path
    """Absolute."""
    caption: str
    class_word: str


@dataclass(frozen=True)
class SkippedImage:
    image: str
    identity: str
    reason: str


@dataclass(frozen=True)
class DroppedIdentity:
    identity: str
    images: int
    """Its usable images (fewer than min-images)."""
    reason: str


@dataclass
class PrepareReport:
    """What report.json holds: what was kept, and what was left out and why."""

    kept_images: int
    kept_identities: int
    skipped: list[SkippedImage]
    dropped_identities: list[DroppedIdentity]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PrepareReport":
        return cls(
            kept_images=int(data["kept_images"]), kept_identities=int(data["kept_identities"]),
            skipped=[SkippedImage(**entry) for entry in data["skipped"]],
            dropped_identities=[DroppedIdentity(**entry) for entry in data["dropped_identities"]],
        )


@dataclass
class AnalysedImage:
    """The features of one usable image: row 0 the image itself, rows 1..A its augmented copies."""

    face: DetectedFace
    arcface: np.ndarray
    """(1 + A, D) float32, L2-normalised."""
    clip_crops: np.ndarray
    """(1 + A, 224, 224, 3) uint8 RGB."""


# ---------------------------------------------------------------------------------------------------- the input


def default_caption(class_word: str) -> str:
    return f"a photo of a {class_word}"


def collect_images(source: str | Path, class_word: str = "person") -> list[SourceImage]:
    """The images of a folder of identities or a JSONL manifest, sorted by identity, then file name."""
    source = Path(source)
    if source.is_dir():
        images = _collect_folder(source, class_word)
    elif source.is_file():
        images = _collect_manifest(source, class_word)
    else:
        raise PrepareError(f"the dataset {source} does not exist; give a folder of identities "
                           "(SOURCE/<identity>/*.jpg) or a JSONL manifest.")
    if not images:
        raise PrepareError(
            f"no images found in {source}: expected a folder per identity holding "
            f"{', '.join(IMAGE_EXTENSIONS)} files (SOURCE/<identity>/photo.jpg, optional photo.txt caption), or a JSONL "
            'manifest with one {"image": ..., "identity": ...} object per line.'
        )
    return sorted(images, key=lambda image: (image.identity, image.path.name, str(image.path)))


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _collect_folder(root: Path, class_word: str) -> list[SourceImage]:
    loose = [p.name for p in root.iterdir() if _is_image(p)]
    if loose:
        log.warning("%d image(s) directly in %s are ignored (%s); put each identity's images in a folder "
                    "of its own, %s/<identity>/.", len(loose), root, ", ".join(sorted(loose)[:3]), root)
    images = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.iterdir() if _is_image(p))
        if not files:
            log.warning("no %s images in %s; it is not an identity.", "/".join(IMAGE_EXTENSIONS), folder)
        for path in files:
            caption = _read_caption(path.with_suffix(".txt")) or default_caption(class_word)
            images.append(SourceImage(folder.name, Path(os.path.abspath(path)), caption, class_word))
    return images


def _read_caption(path: Path) -> str:
    """The caption file beside an image, stripped ('' when there is none). Several lines are kept as they are (one
    caption per line is MM-CelebA-HQ's layout, DESIGN.md §2.6)."""
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as err:
        log.warning("cannot read the caption %s (%s); using the default caption.", path, err)
        return ""


def _collect_manifest(manifest: Path, class_word: str) -> list[SourceImage]:
    images = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrepareError(f"{where} is not JSON ({err}); each line must be one object like "
                               '{"image": "a/1.jpg", "identity": "a", "caption": "...", "class_word": "man"}.') from err
        if not isinstance(entry, dict):
            raise PrepareError(f"{where} is a JSON {type(entry).__name__}, not an object with 'image' and 'identity'.")
        identity = entry.get("identity")
        if isinstance(identity, int) and not isinstance(identity, bool):
            identity = str(identity)  # CelebA-style numeric identity labels
        for key, value in (("image", entry.get("image")), ("identity", identity)):
            if not isinstance(value, str) or not value:
                raise PrepareError(f"{where} needs a non-empty string '{key}' (got {value!r}).")
        for key in ("caption", "class_word"):
            if key in entry and not isinstance(entry[key], str):
                raise PrepareError(f"{where}: '{key}' must be a string (got {entry[key]!r}).")
        path = Path(entry["image"])
        path = Path(os.path.abspath(path if path.is_absolute() else manifest.parent / path))
        word = entry.get("class_word") or class_word
        images.append(SourceImage(identity, path, entry.get("caption") or default_caption(word), word))
    return images


def fingerprint(images: list[SourceImage]) -> str:
    """sha256 of the image list with captions and class words: a re-run on a changed dataset is detected."""
    listing = [[image.identity, str(image.path), image.caption, image.class_word] for image in images]
    return hashlib.sha256(json.dumps(listing, ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------- one image


def augmentation_rng(seed: int, image_index: int) -> np.random.Generator:
    """The generator of one image's augmented copies: the same for the same (seed, position in the sorted list)."""
    return np.random.default_rng([seed, image_index])


def analyse_image(
    analyzer: FaceAnalyzer,
    image: SourceImage,
    image_index: int,
    *,
    augmentations: int,
    seed: int,
    min_face_size: int,
    clip_crop_scale: float,
) -> AnalysedImage | str:
    """The largest face's ArcFace embedding and CLIP crop, plus `augmentations` augmented copies; or why the
    image cannot be used (a sentence)."""
    try:
        rgb = to_rgb_uint8(load_image(image.path))
    except Exception as err:  # PIL's decoders raise OSError, ValueError, SyntaxError,
        # DecompressionBombError, ... for missing, corrupt or truncated files; one bad file must not stop the run
        return f"unreadable image ({type(err).__name__}: {err})"
    try:
        face = detect_face(analyzer, rgb, image_index, face_index=None, min_face_size=min_face_size)
    except cv2.error as err:  # insightface's resize fails on extreme aspect ratios (e.g. 4000x3 px)
        return f"face detection failed on this {rgb.shape[1]}x{rgb.shape[0]} px image ({' '.join(str(err).split())})"
    if isinstance(face, str):
        return face
    if face.faces_in_image > 1:
        log.info("%s has %d faces; using the largest", image.path, face.faces_in_image)
    rng = augmentation_rng(seed, image_index)
    variants = [None, *(Augmentation.sample(rng) for _ in range(augmentations))]
    crops = [align_reference(rgb, face, analyzer.arcface_size, CLIP_CROP_SIZE, clip_crop_scale, augmentation=a)
             for a in variants]
    return AnalysedImage(
        face=face,
        arcface=np.stack([analyzer.embed(crop.arcface_crop) for crop in crops]).astype(np.float32),
        clip_crops=np.stack([crop.clip_crop for crop in crops]),
    )


# ---------------------------------------------------------------------------------------------------- writing


def _feature_arrays(rows: list[AnalysedImage], embed_dim: int, augmentations: int) -> dict[str, np.ndarray]:
    """The four shard tensors of `rows` (also right for no rows: zero-length arrays of the right shape)."""
    size = CLIP_CROP_SIZE
    if not rows:
        return {"arcface": np.zeros((0, embed_dim), np.float32), "clip_crop": np.zeros((0, size, size, 3), np.uint8),
                "arcface_aug": np.zeros((0, augmentations, embed_dim), np.float32),
                "clip_crop_aug": np.zeros((0, augmentations, size, size, 3), np.uint8)}
    arcface = np.stack([row.arcface for row in rows])
    crops = np.stack([row.clip_crops for row in rows])
    return {"arcface": arcface[:, 0], "clip_crop": crops[:, 0], "arcface_aug": arcface[:, 1:], "clip_crop_aug": crops[:, 1:]}


def _face_json(face: DetectedFace) -> dict:
    return {"box": [float(v) for v in face.box], "landmarks": [[float(x), float(y)] for x, y in face.landmarks],
            "faces_in_image": int(face.faces_in_image)}


class _ShardWriter:
    """Collects kept rows and writes a shard each time `shard_size` rows are in."""

    def __init__(self, out_dir: Path, shard_size: int) -> None:
        self.out_dir, self.shard_size = out_dir, shard_size
        self.rows: list[dict[str, np.ndarray]] = []
        self.shards_written = 0

    def add(self, row: dict[str, np.ndarray]) -> tuple[str, int]:
        name, position = SHARD_PATTERN.format(self.shards_written), len(self.rows)
        self.rows.append(row)
        if len(self.rows) == self.shard_size:
            self.flush()
        return name, position

    def flush(self) -> None:
        if not self.rows:
            return
        arrays = {key: np.stack([row[key] for row in self.rows]) for key in SHARD_KEYS}
        save_arrays(self.out_dir / SHARD_PATTERN.format(self.shards_written), arrays)
        self.shards_written += 1
        self.rows = []


# ---------------------------------------------------------------------------------------------------- the run


def prepare_dataset(
    source: str | Path,
    out_dir: str | Path,
    analyzer: FaceAnalyzer,
    *,
    class_word: str = "person",
    min_face_size: int = 64,
    min_images: int = 2,
    augmentations: int = 2,
    seed: int = 0,
    shard_size: int = 256,
    clip_crop_scale: float = CLIP_CROP_SCALE,
    overwrite: bool = False,
    work_chunk_size: int = 32,
) -> PrepareReport:
    """Analyse every image of `source` and write the cache to `out_dir`; resumes an unfinished run of the same
    settings, returns at once for a finished one, and refuses a cache made with other settings unless `overwrite`.

    `work_chunk_size` (our choice) is how many images are analysed between two saves of the work in progress."""
    for name, value, least in (("min_face_size", min_face_size, 0), ("min_images", min_images, 1),
                               ("augmentations", augmentations, 0), ("shard_size", shard_size, 1),
                               ("work_chunk_size", work_chunk_size, 1)):
        if value < least:
            raise PrepareError(f"{name} must be at least {least}, got {value}")
    if not clip_crop_scale > 0:
        raise PrepareError(f"clip_crop_scale must be positive, got {clip_crop_scale}")
    source, out_dir = Path(os.path.abspath(source)), Path(out_dir)
    images = collect_images(source, class_word)
    settings = cache_settings(
        analyzer.name, analyzer.embed_dim, det_size=analyzer.det_size, min_face_size=min_face_size,
        min_images=min_images, augmentations=augmentations, seed=seed, clip_crop_scale=clip_crop_scale,
        source=str(source), shard_size=shard_size, source_fingerprint=fingerprint(images),
    )
    plan = {"settings": settings, "work_chunk_size": work_chunk_size}
    if overwrite:
        remove_cache(out_dir)
    finished = _read_json(out_dir / SETTINGS_FILE)
    if finished is not None:
        _check_same(out_dir, finished, settings)
        shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)  # left over when killed after prepare.json was written
        log.info("the cache %s is already complete", out_dir)
        return PrepareReport.from_json(_read_json(out_dir / REPORT_FILE))
    work_dir = out_dir / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    started = _read_json(work_dir / WORK_PLAN_FILE)
    if started is None:
        write_text_atomic(work_dir / WORK_PLAN_FILE, json.dumps(plan, indent=2))
    else:
        _check_same(out_dir, started.get("settings", {}), settings)
        if started.get("work_chunk_size") != work_chunk_size:
            raise CacheError(f"the unfinished cache {out_dir} was started with work_chunk_size "
                             f"{started.get('work_chunk_size')}; continue with that, or pass overwrite=True.")
    _analyse_all(images, work_dir, analyzer, settings, work_chunk_size)
    report = _finalize(images, out_dir, settings, work_chunk_size)
    shutil.rmtree(work_dir)
    return report


def remove_cache(out_dir: Path) -> None:
    """Delete what `prepare` writes in `out_dir` (and nothing else there)."""
    for name in (SETTINGS_FILE, INDEX_FILE, REPORT_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for shard in out_dir.glob("shard-*.safetensors"):
        shard.unlink()
    shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _check_same(out_dir: Path, found: dict, wanted: dict) -> None:
    changed = [f"{key} {found.get(key)!r} -> {wanted[key]!r}" for key in wanted
               if key != "source_fingerprint" and found.get(key) != wanted[key]]
    if found.get("source_fingerprint") != wanted["source_fingerprint"]:
        changed.append("the list of images, captions or class words changed")
    if changed:
        raise CacheError(f"the cache {out_dir} was made with other settings ({'; '.join(changed)}); pass --overwrite "
                         "to rebuild it, or choose another --out.")


def _chunk_path(work_dir: Path, chunk: int) -> Path:
    return work_dir / WORK_CHUNK_PATTERN.format(chunk)


def _chunk_images(chunk: int, chunk_size: int, num_images: int) -> range:
    """Positions in the sorted image list of one work chunk's images."""
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, num_images))


def _analyse_all(images: list[SourceImage], work_dir: Path, analyzer: FaceAnalyzer, settings: dict,
                 chunk_size: int) -> None:
    """Step 1: every missing work chunk, in order. A chunk file holds the features of its usable images and, in its
    metadata, per image either the face found or the reason it was skipped."""
    chunks = range(math.ceil(len(images) / chunk_size))
    missing = [chunk for chunk in chunks if not _chunk_path(work_dir, chunk).is_file()]
    todo = sum(len(_chunk_images(chunk, chunk_size, len(images))) for chunk in missing)
    if todo < len(images):
        log.info("resuming, %d of %d images already analysed", len(images) - todo, len(images))
    options = dict(augmentations=settings["augmentations"], seed=settings["seed"],
                   min_face_size=settings["min_face_size"], clip_crop_scale=settings["clip_crop_scale"])
    with logging_redirect_tqdm(), tqdm(total=len(images), initial=len(images) - todo, desc="prepare",
                                       unit="image") as progress:
        for chunk in missing:
            outcomes, rows = [], []
            for index in _chunk_images(chunk, chunk_size, len(images)):
                result = analyse_image(analyzer, images[index], index, **options)
                if isinstance(result, str):
                    log.info("skipping %s: %s", images[index].path, result)
                    outcomes.append({"skipped": result})
                else:
                    outcomes.append(_face_json(result.face))
                    rows.append(result)
                progress.update()
            arrays = _feature_arrays(rows, settings["face_embed_dim"], settings["augmentations"])
            save_arrays(_chunk_path(work_dir, chunk), arrays, metadata={"outcomes": json.dumps(outcomes)})


def _finalize(images: list[SourceImage], out_dir: Path, settings: dict, chunk_size: int) -> PrepareReport:
    """Step 2: drop identities with too few usable images, then shards, index, report and settings."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    work_dir = out_dir / WORK_DIR
    chunks = range(math.ceil(len(images) / chunk_size))
    outcomes = []
    for chunk in chunks:
        with safe_open(str(_chunk_path(work_dir, chunk)), framework="numpy") as handle:
            outcomes += json.loads(handle.metadata()["outcomes"])
    usable = Counter(image.identity for image, outcome in zip(images, outcomes) if "skipped" not in outcome)
    min_images = settings["min_images"]
    dropped = [
        DroppedIdentity(identity, usable[identity],
                        f"{usable[identity]} usable image(s), fewer than min-images {min_images}")
        for identity in dict.fromkeys(image.identity for image in images) if usable[identity] < min_images
    ]
    dropped_names = {entry.identity for entry in dropped}
    skipped = [SkippedImage(str(image.path), image.identity, outcome["skipped"])
               for image, outcome in zip(images, outcomes) if "skipped" in outcome]

    shards = _ShardWriter(out_dir, settings["shard_size"])
    records: list[CacheRecord] = []
    for chunk in tqdm(chunks, desc="write shards", unit="chunk"):
        arrays = load_file(str(_chunk_path(work_dir, chunk)))
        chunk_row = 0
        for index in _chunk_images(chunk, chunk_size, len(images)):
            image, outcome = images[index], outcomes[index]
            if "skipped" in outcome:
                continue
            chunk_row += 1
            if image.identity in dropped_names:
                continue
            shard, shard_row = shards.add({key: arrays[key][chunk_row - 1] for key in SHARD_KEYS})
            records.append(CacheRecord(
                row=len(records), identity=image.identity, image=str(image.path), caption=image.caption,
                class_word=image.class_word, shard=shard, shard_row=shard_row, box=tuple(outcome["box"]),
                landmarks=tuple(tuple(point) for point in outcome["landmarks"]),
                faces_in_image=outcome["faces_in_image"],
            ))
    shards.flush()

    report = PrepareReport(kept_images=len(records), kept_identities=len(usable.keys() - dropped_names),
                           skipped=skipped, dropped_identities=dropped)
    if not write_cache(out_dir, records, report.to_json(), settings):
        raise PrepareError(
            f"no identity has {min_images} or more usable images, so the cache would be empty; see "
            f"{out_dir / REPORT_FILE} for what was skipped and why (lower --min-images, or --min-face-size for small faces)."
        )
    log.info("kept %d images of %d identities in %s; skipped %d images, dropped %d identities (see %s)",
             report.kept_images, report.kept_identities, out_dir, len(skipped), len(dropped), out_dir / REPORT_FILE)
    return report


# ---------------------------------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="a folder of identities (SOURCE/<identity>/*.jpg|jpeg|png|webp, "
                        "an optional same-name .txt caption beside each image) or a JSONL manifest")
    parser.add_argument("--out", type=Path, required=True,
                        help="the cache folder to write; run the same command again to continue a stopped run")
    parser.add_argument("--insightface-root", type=Path, required=True,
                        help="folder holding models/<face-model>/*.onnx (never downloaded)")
    parser.add_argument("--face-model", default="antelopev2", help="insightface model pack name (default antelopev2)")
    parser.add_argument("--det-size", type=int, default=640, help="face detection size (default 640)")
    parser.add_argument("--provider", default="CPU", choices=list(PROVIDERS), help="onnxruntime provider")
    parser.add_argument("--min-face-size", type=int, default=64,
                        help="skip faces whose box is smaller than this, in pixels (default 64)")
    parser.add_argument("--min-images", type=int, default=2,
                        help="drop identities with fewer usable images than this (default 2)")
    parser.add_argument("--augmentations", type=int, default=2,
                        help="seeded augmented copies (flip, rotation, colour) cached per image (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentations (default 0)")
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard file (default 256)")
    parser.add_argument("--class-word", default="person",
                        help='class word of the default caption "a photo of a <class word>" (default person)')
    parser.add_argument("--clip-crop-scale", type=float, default=CLIP_CROP_SCALE,
                        help=f"width of the CLIP crop in ArcFace crop widths (default {CLIP_CROP_SCALE}, as the nodes)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing cache in --out and start over")


def run(args: argparse.Namespace) -> PrepareReport:
    analyzer = load_face_analyzer(args.insightface_root, args.face_model, args.provider, args.det_size)
    return prepare_dataset(
        args.source, args.out, analyzer, class_word=args.class_word, min_face_size=args.min_face_size,
        min_images=args.min_images, augmentations=args.augmentations, seed=args.seed, shard_size=args.shard_size,
        clip_crop_scale=args.clip_crop_scale, overwrite=args.overwrite,
    )
