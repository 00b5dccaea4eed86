"""The training cache that `python -m train prepare` writes (train/prepare.py analyses the images): its layout,
`write_cache` (the files written after the shards, the one writer of the format) and `TrainCache` (the reader).

    CACHE/prepare.json            the settings it was made with (format, version, face model, embedding width, ...)
    CACHE/index.jsonl             one record per kept image, rows 0..n-1 in (identity, file name) order
    CACHE/shard-NNNNN.safetensors "arcface" (R, D) float32, "clip_crop" (R, 224, 224, 3) uint8 RGB,
                                  "arcface_aug" (R, A, D), "clip_crop_aug" (R, A, 224, 224, 3)
    CACHE/report.json             images skipped and identities dropped, with the reasons

Shards are opened lazily (memory-mapped by safetensors) and only the rows asked for are read, so a data loader
touches a few hundred kilobytes per reference, never whole shards.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idadapter_core.errors import IDAdapterError
from idadapter_core.face import CLIP_CROP_SIZE
from idadapter_core.weights import atomic_write

CACHE_FORMAT = "idadapter-train-cache"
CACHE_VERSION = 1
SETTINGS_FILE = "prepare.json"
INDEX_FILE = "index.jsonl"
REPORT_FILE = "report.json"
WORK_DIR = "work"
SHARD_PATTERN = "shard-{:05d}.safetensors"
SHARD_KEYS = ("arcface", "clip_crop", "arcface_aug", "clip_crop_aug")


class CacheError(IDAdapterError):
    """The training cache is missing, unfinished, inconsistent, or was made with other settings."""


@dataclass(frozen=True)
class CacheRecord:
    """One kept image: where it came from, its caption, and where its features sit."""

    row: int
    identity: str
    image: str
    """Absolute path of the source image."""
    caption: str
    class_word: str
    shard: str
    """File name of its shard in the cache folder."""
    shard_row: int
    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 of the face used, in source image pixels."""
    landmarks: tuple[tuple[float, float], ...]
    """5 points (eyes, nose tip, mouth corners) in source image pixels, insightface order."""
    faces_in_image: int

    @classmethod
    def from_json(cls, entry: dict) -> "CacheRecord":
        return cls(
            row=int(entry["row"]), identity=str(entry["identity"]), image=str(entry["image"]),
            caption=str(entry["caption"]), class_word=str(entry["class_word"]), shard=str(entry["shard"]),
            shard_row=int(entry["shard_row"]), box=tuple(float(v) for v in entry["box"]),
            landmarks=tuple((float(x), float(y)) for x, y in entry["landmarks"]),
            faces_in_image=int(entry["faces_in_image"]),
        )

    def to_json(self) -> dict:
        return {
            "row": self.row, "identity": self.identity, "image": self.image, "caption": self.caption,
            "class_word": self.class_word, "shard": self.shard, "shard_row": self.shard_row, "box": list(self.box),
            "landmarks": [list(point) for point in self.landmarks], "faces_in_image": self.faces_in_image,
        }


def cache_settings(face_model: str, face_embed_dim: int, *, det_size: int, min_face_size: int, min_images: int,
                   augmentations: int, seed: int, clip_crop_scale: float, source: str, shard_size: int,
                   source_fingerprint: str) -> dict:
    """What prepare.json holds: the format and the settings the cache was made with."""
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "face_model": face_model, "face_embed_dim": face_embed_dim,
        "det_size": det_size, "min_face_size": min_face_size, "min_images": min_images,
        "augmentations": augmentations, "seed": seed, "clip_crop_size": CLIP_CROP_SIZE,
        "clip_crop_scale": float(clip_crop_scale), "source": source, "shard_size": shard_size,
        "source_fingerprint": source_fingerprint,
    }


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_arrays(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of numpy arrays (a shard: the SHARD_KEYS), written atomically."""
    from safetensors.numpy import save_file

    arrays = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))


def write_cache(folder: Path, records: list[CacheRecord], report: dict, settings: dict) -> bool:
    """The files of a cache after its shards (`save_arrays`), each atomically: index.jsonl, report.json, then, when
    there are records, prepare.json (`cache_settings`), the mark of a finished cache. Returns whether it finished (a
    cache without records never does)."""
    index = "".join(json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records)
    write_text_atomic(folder / INDEX_FILE, index)
    write_text_atomic(folder / REPORT_FILE, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if not records:
        return False
    write_text_atomic(folder / SETTINGS_FILE, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    return True


class TrainCache:
    """A finished cache: settings, records, and per-row features read from the shards on demand.

    Picklable (open shard handles are dropped and reopened), so it can be handed to data loader workers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        settings_path = self.path / SETTINGS_FILE
        if not settings_path.is_file():
            if (self.path / WORK_DIR).is_dir():
                raise CacheError(
                    f"the training cache {self.path} is unfinished (no {SETTINGS_FILE}, a {WORK_DIR}/ folder is there): "
                    "`python -m train prepare` was stopped; run the same command again to finish it."
                )
            raise CacheError(
                f"no training cache at {self.path} ({SETTINGS_FILE} not found); make one with "
                f"`python -m train prepare SOURCE --out {self.path} --insightface-root ROOT`."
            )
        self.settings: dict = json.loads(settings_path.read_text(encoding="utf-8"))
        if self.settings.get("format") != CACHE_FORMAT or self.settings.get("version") != CACHE_VERSION:
            raise CacheError(
                f"{settings_path} is not a version {CACHE_VERSION} {CACHE_FORMAT} (format {self.settings.get('format')!r}, "
                f"version {self.settings.get('version')!r}); re-run `python -m train prepare` with --overwrite."
            )
        self.records: list[CacheRecord] = self._read_index()
        self._shard_rows: dict[str, int] = {}
        for record in self.records:
            self._shard_rows[record.shard] = max(self._shard_rows.get(record.shard, 0), record.shard_row + 1)
        missing = sorted(name for name in self._shard_rows if not (self.path / name).is_file())
        if missing:
            raise CacheError(
                f"the training cache {self.path} is incomplete: {', '.join(missing)} missing; "
                "re-run `python -m train prepare` with --overwrite to rebuild it."
            )
        self._handles: dict[str, object] = {}

    def _read_index(self) -> list[CacheRecord]:
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise CacheError(f"the training cache {self.path} has no {INDEX_FILE}; re-run `python -m train prepare` "
                             "with --overwrite to rebuild it.")
        records = []
        for number, line in enumerate(index_path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                records.append(CacheRecord.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as err:
                raise CacheError(f"{index_path} line {number} is not a cache record ({type(err).__name__}: {err}); "
                                 "re-run `python -m train prepare` with --overwrite.") from err
            if records[-1].row != len(records) - 1:
                raise CacheError(f"{index_path} line {number} has row {records[-1].row}, expected {len(records) - 1}; "
                                 "re-run `python -m train prepare` with --overwrite.")
        return records

    def __len__(self) -> int:
        return len(self.records)

    @property
    def face_embed_dim(self) -> int:
        return int(self.settings["face_embed_dim"])

    @property
    def num_augmentations(self) -> int:
        return int(self.settings["augmentations"])

    def identities(self) -> dict[str, list[CacheRecord]]:
        """Records grouped by identity, identities in cache order (sorted), each list in row order."""
        grouped: dict[str, list[CacheRecord]] = {}
        for record in self.records:
            grouped.setdefault(record.identity, []).append(record)
        return grouped

    def arcface(self, row: int) -> torch.Tensor:
        """(D,) float32 L2-normalised ArcFace embedding of the image itself."""
        return self._read(row, "arcface")

    def clip_crop(self, row: int) -> torch.Tensor:
        """(224, 224, 3) uint8 RGB CLIP crop of the image itself."""
        return self._read(row, "clip_crop")

    def arcface_aug(self, row: int, k: int) -> torch.Tensor:
        """(D,) float32 ArcFace embedding of the k-th augmented copy."""
        return self._read(row, "arcface_aug", self._augmentation_index(k))

    def clip_crop_aug(self, row: int, k: int) -> torch.Tensor:
        """(224, 224, 3) uint8 RGB CLIP crop of the k-th augmented copy."""
        return self._read(row, "clip_crop_aug", self._augmentation_index(k))

    def _augmentation_index(self, k: int) -> int:
        if not 0 <= k < self.num_augmentations:
            raise IndexError(f"augmented copy {k} asked for; the cache has {self.num_augmentations} per image "
                             f"(0..{self.num_augmentations - 1}, set by prepare --augmentations)")
        return k

    def _read(self, row: int, key: str, k: int | None = None) -> torch.Tensor:
        if not 0 <= row < len(self.records):
            raise IndexError(f"row {row} asked for; the cache has rows 0..{len(self.records) - 1}")
        record = self.records[row]
        rows = self._shard(record.shard).get_slice(key)
        i = record.shard_row
        return rows[i:i + 1][0] if k is None else rows[i:i + 1, k:k + 1][0, 0]

    def _shard(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.path / name), framework="pt")
            self._check_shard(name, handle)
            self._handles[name] = handle
        return handle

    def _check_shard(self, name: str, handle) -> None:
        rows, dim, copies = self._shard_rows[name], self.face_embed_dim, self.num_augmentations
        size = int(self.settings["clip_crop_size"])
        expected = {"arcface": [rows, dim], "clip_crop": [rows, size, size, 3], "arcface_aug": [rows, copies, dim],
                    "clip_crop_aug": [rows, copies, size, size, 3]}
        found = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
        if found != expected:
            raise CacheError(f"{self.path / name} holds {found}, but the index and settings expect {expected}; "
                             "re-run `python -m train prepare` with --overwrite.")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
