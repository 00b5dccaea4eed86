"""Aligned crops of a detected face: insightface's ArcFace template (112x112) and a wider square crop on the same
landmarks for CLIP (224x224), and filling up to N references by replication or augmentation (docs/DESIGN.md §2.2)."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from ..errors import IDAdapterError
from .detection import DetectedFace, SkipReason, detect_face
from .models import FaceAnalyzer

log = logging.getLogger(__name__)

CLIP_CROP_SIZE = 224
CLIP_CROP_SCALE = 1.5
"""[I] The CLIP crop shows 1.5x the width of the ArcFace crop around the same centre (hair, chin and jaw
in view), as IP-Adapter-FaceID-Plus and PhotoMaker give their CLIP encoders a looser face crop."""

FILL_MODES = ("replicate", "augment")


@dataclass(frozen=True)
class Augmentation:
    """One training-style augmentation of a reference (docs/DESIGN.md §2.2: flipping, rotating, colour)."""

    flip: bool
    angle: float
    """Degrees, counter-clockwise, about the face centre."""
    brightness: float
    contrast: float
    saturation: float

    @classmethod
    def sample(cls, rng: np.random.Generator, max_angle: float = 10.0, jitter: float = 0.1) -> "Augmentation":
        return cls(
            flip=bool(rng.random() < 0.5),
            angle=float(rng.uniform(-max_angle, max_angle)),
            brightness=float(rng.uniform(1 - jitter, 1 + jitter)),
            contrast=float(rng.uniform(1 - jitter, 1 + jitter)),
            saturation=float(rng.uniform(1 - jitter, 1 + jitter)),
        )

    def describe(self) -> str:
        flip = "flip, " if self.flip else ""
        return (f"{flip}rotate {self.angle:+.1f} deg, brightness {self.brightness:.2f}, contrast {self.contrast:.2f}, "
                f"saturation {self.saturation:.2f}")

    def matrix(self, frame_size: int) -> np.ndarray:
        """3x3 affine in the ArcFace crop's pixel frame: mirror, then rotate, about the crop centre."""
        centre = (frame_size - 1) / 2.0
        to_origin = np.array([[1, 0, -centre], [0, 1, -centre], [0, 0, 1]], np.float64)
        mirror = np.diag([-1.0 if self.flip else 1.0, 1.0, 1.0])
        rotation = np.eye(3)
        rotation[:2] = cv2.getRotationMatrix2D((0.0, 0.0), self.angle, 1.0)
        return np.linalg.inv(to_origin) @ rotation @ mirror @ to_origin

    def apply_colour(self, crop: np.ndarray) -> np.ndarray:
        values = crop.astype(np.float32) * self.brightness
        gray = values @ np.array([0.299, 0.587, 0.114], np.float32)
        values = gray.mean() + (values - gray.mean()) * self.contrast
        gray = values @ np.array([0.299, 0.587, 0.114], np.float32)
        values = gray[..., None] + (values - gray[..., None]) * self.saturation
        return np.clip(np.round(values), 0, 255).astype(np.uint8)


def arcface_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """insightface's similarity transform of the 5 landmarks onto its ArcFace template (`face_align.estimate_norm`),
    as a 3x3 matrix."""
    from insightface.utils import face_align

    with warnings.catch_warnings():  # scikit-image >= 0.26 deprecates the estimate() call insightface makes
        warnings.simplefilter("ignore", FutureWarning)
        matrix = face_align.estimate_norm(np.asarray(landmarks, np.float32), size)
    return np.vstack([matrix, [0.0, 0.0, 1.0]])


def wide_crop_matrix(arcface_size: int, crop_size: int, scale: float) -> np.ndarray:
    """3x3 map from ArcFace-crop pixels to a `crop_size` square showing `scale` times its width about the same
    centre (pixel centres kept exact, so scale 1 is the ArcFace crop resampled)."""
    zoom = crop_size / (arcface_size * scale)
    shift = (crop_size - 1) / 2.0 - zoom * (arcface_size - 1) / 2.0
    return np.array([[zoom, 0.0, shift], [0.0, zoom, shift], [0.0, 0.0, 1.0]])


def warp(image_rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """`cv2.warpAffine` as insightface's `norm_crop` calls it (bilinear, black border)."""
    return cv2.warpAffine(image_rgb, matrix[:2], (size, size), borderValue=0.0)


@dataclass
class AlignedReference:
    face: DetectedFace
    arcface_crop: np.ndarray
    """(S, S, 3) uint8 RGB on insightface's ArcFace template (S = the recognizer's input, 112)."""
    clip_crop: np.ndarray
    """(224, 224, 3) uint8 RGB, the wider square crop for CLIP."""
    clip_landmarks: np.ndarray
    """(5, 2) the landmarks in `clip_crop` pixels."""
    augmentation: Augmentation | None = None


def align_reference(
    image_rgb: np.ndarray,
    face: DetectedFace,
    arcface_size: int = 112,
    clip_crop_size: int = CLIP_CROP_SIZE,
    clip_crop_scale: float = CLIP_CROP_SCALE,
    augmentation: Augmentation | None = None,
) -> AlignedReference:
    """Both crops of one face, warped once from the source image (an augmentation's flip and rotation are
    folded into the warp, so no corners go black and pixels are resampled once)."""
    arc = arcface_matrix(face.landmarks, arcface_size)
    if augmentation is not None:
        arc = augmentation.matrix(arcface_size) @ arc
    clip = wide_crop_matrix(arcface_size, clip_crop_size, clip_crop_scale) @ arc
    arcface_crop = warp(image_rgb, arc, arcface_size)
    clip_crop = warp(image_rgb, clip, clip_crop_size)
    if augmentation is not None:
        arcface_crop = augmentation.apply_colour(arcface_crop)
        clip_crop = augmentation.apply_colour(clip_crop)
    points = np.hstack([face.landmarks, np.ones((5, 1), np.float32)]) @ clip[:2].T
    return AlignedReference(face, arcface_crop, clip_crop, points.astype(np.float32), augmentation)


def arcface_crop(analyzer: FaceAnalyzer, image_rgb: np.ndarray, source_index: int = 0,
                 min_face_size: int = 64) -> np.ndarray | SkipReason:
    """(S, S, 3) uint8: the image's largest face aligned as the analyzer's recognizer takes it (S its input size), or
    why there is none (`detect_face`'s reason)."""
    face = detect_face(analyzer, image_rgb, source_index, min_face_size=min_face_size)
    return face if isinstance(face, str) else align_reference(image_rgb, face, analyzer.arcface_size).arcface_crop


def align_references(
    images_rgb: Sequence[np.ndarray],
    faces: Sequence[DetectedFace],
    num_refs: int,
    fill_mode: str = "replicate",
    seed: int = 0,
    arcface_size: int = 112,
    clip_crop_size: int = CLIP_CROP_SIZE,
    clip_crop_scale: float = CLIP_CROP_SCALE,
) -> list[AlignedReference]:
    """Exactly `num_refs` aligned references from the K faces found (docs/DESIGN.md §2.2).

    The first min(K, N) are the faces themselves; the rest cycle through them, copied as they are
    ("replicate", the paper's inference: one image duplicated N times) or with a random flip, rotation and
    colour jitter ("augment", the paper's training enrichment), drawn from `seed`."""
    if fill_mode not in FILL_MODES:
        raise IDAdapterError(f"fill mode '{fill_mode}' is not one of {', '.join(FILL_MODES)}")
    if num_refs < 1:
        raise IDAdapterError(f"the number of references must be at least 1, got {num_refs}")
    if len(faces) > num_refs:
        log.warning("Face features: %d usable references, using the first %d (N = %d)", len(faces), num_refs, num_refs)
        faces = faces[:num_refs]
    crop_args = dict(arcface_size=arcface_size, clip_crop_size=clip_crop_size, clip_crop_scale=clip_crop_scale)
    originals = [align_reference(images_rgb[f.source_index], f, **crop_args) for f in faces]
    references = list(originals)
    rng = np.random.default_rng(seed)
    for slot in range(len(faces), num_refs):
        source = originals[slot % len(faces)]
        if fill_mode == "replicate":
            references.append(source)
        else:
            augmentation = Augmentation.sample(rng)
            face = source.face
            references.append(align_reference(images_rgb[face.source_index], face, augmentation=augmentation, **crop_args))
    return references
