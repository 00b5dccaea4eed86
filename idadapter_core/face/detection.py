"""One face per reference image: detection with fallback sizes, the largest (or n-th from the left) face, a minimum
size, and the reasons an image is skipped."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from ..errors import IDAdapterError, ImageFormatError, NoFaceError
from .images import as_image_list, to_rgb_uint8
from .models import FaceAnalyzer

log = logging.getLogger(__name__)


ProgressFn = Callable[[int, int], None]
"""Called with (images done, images in all) after each reference image."""


class SkipReason(str):
    """Why an image has no usable face (the sentence itself) and what to try about it (`tip`)."""

    tip: str

    def __new__(cls, reason: str, tip: str) -> "SkipReason":
        skip = super().__new__(cls, reason)
        skip.tip = tip
        return skip


FACE_CHOICES = ("largest", "left to right")
"""Which face of a photo holding several is used: the largest, or the `face_index`-th from the left (a group photo
can give each person's references)."""


def chosen_face_index(face: str, face_index: int) -> int | None:
    """`detect_face`'s `face_index` for a `FACE_CHOICES` choice: None for the largest face, else `face_index`
    (0 the leftmost face)."""
    if face not in FACE_CHOICES:
        raise IDAdapterError(f"unknown face choice '{face}'; use one of: {', '.join(FACE_CHOICES)}")
    if face == FACE_CHOICES[0]:
        return None
    if face_index < 0:
        raise IDAdapterError(f"face_index is {face_index}; faces are counted from 0 (the leftmost), left to right.")
    return face_index


DETECTION_SIZE_TIP = ("try another detection size in Load InsightFace (smaller for close-up crops, larger for small "
                      "faces in big photos), or crop the images closer to the face")


@dataclass
class DetectedFace:
    source_index: int
    """Position of the image in the input sequence."""
    box: np.ndarray
    """(4,) x1, y1, x2, y2 in image pixels."""
    landmarks: np.ndarray
    """(5, 2) eyes, nose tip, mouth corners, in image pixels (insightface order)."""
    score: float
    faces_in_image: int
    det_size: int
    """The detection size that found it."""

    @property
    def size(self) -> float:
        """The shorter side of the box, in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def detect_face(
    analyzer: FaceAnalyzer,
    image_rgb: np.ndarray,
    source_index: int,
    face_index: int | None = None,
    min_face_size: int = 64,
) -> DetectedFace | SkipReason:
    """The chosen face of one image, or why there is none (a sentence, with what to try as its `tip`).

    `face_index` None keeps the largest face; 0, 1, ... counts faces from the left. Detection sizes below the
    analyzer's are tried in turn until a face is found."""
    for det_size in analyzer.detection_sizes():
        try:
            boxes, landmarks = analyzer.detect(image_rgb, det_size)
        except cv2.error as err:  # insightface's resize fails on extreme aspect ratios (e.g. 4000x3 px)
            height, width = image_rgb.shape[:2]
            return SkipReason(
                f"face detection failed on this {width}x{height} px image ({str(err).strip().splitlines()[-1]})",
                "crop the image to an ordinary aspect ratio",
            )
        if len(boxes):
            break
    else:
        sizes = ", ".join(str(s) for s in analyzer.detection_sizes())
        return SkipReason(f"no face found (detection sizes {sizes} tried)", DETECTION_SIZE_TIP)
    if face_index is None:
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        chosen = int(np.argmax(areas))
    else:
        left_to_right = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2, kind="stable")
        if face_index >= len(boxes):
            return SkipReason(
                f"face_index {face_index} asked for (left to right, 0 the leftmost), but the image holds only "
                f"{len(boxes)} face(s)",
                "set face to 'largest', or face_index to a face that every image holds",
            )
        chosen = int(left_to_right[face_index])
    face = DetectedFace(
        source_index=source_index,
        box=boxes[chosen, :4].astype(np.float32),
        landmarks=landmarks[chosen].astype(np.float32),
        score=float(boxes[chosen, 4]),
        faces_in_image=len(boxes),
        det_size=det_size,
    )
    if face.size < min_face_size:
        return SkipReason(
            f"face too small ({face.size:.0f} px, minimum {min_face_size} px); use a larger or closer photo",
            "lower min_face_size, or use photos in which the face is larger",
        )
    return face


def find_reference_faces(
    analyzer: FaceAnalyzer,
    images: torch.Tensor | np.ndarray | Sequence,
    face_index: int | None = None,
    min_face_size: int = 64,
    image_names: Sequence[str] | None = None,
    on_progress: ProgressFn | None = None,
) -> tuple[list[DetectedFace], list[np.ndarray], dict[int, SkipReason]]:
    """Detect one face per image. Returns the faces found, every image as RGB uint8, and the skipped images'
    indices with the reason. An image without a usable face is skipped with a warning naming it; only when no
    image is usable, `NoFaceError` lists them all."""
    images = as_image_list(images)
    names = list(image_names) if image_names is not None else [f"image {i + 1}/{len(images)}" for i in range(len(images))]
    faces: list[DetectedFace] = []
    rgb_images: list[np.ndarray] = []
    skipped: dict[int, SkipReason] = {}
    for index, image in enumerate(images):
        try:
            rgb = to_rgb_uint8(image)
        except ImageFormatError as err:
            rgb, result = None, SkipReason(str(err), "convert the image to an RGB or grayscale picture")
        else:
            result = detect_face(analyzer, rgb, index, face_index, min_face_size)
        rgb_images.append(rgb)
        if isinstance(result, DetectedFace):
            faces.append(result)
            if result.faces_in_image > 1:
                which = "the largest" if face_index is None else f"face {face_index} from the left"
                log.info("Face features: %s has %d faces; using %s", names[index], result.faces_in_image, which)
        else:
            skipped[index] = result
            log.warning("Face features: skipping reference %s: %s", names[index], result)
        if on_progress is not None:
            on_progress(index + 1, len(images))
    if not faces:
        details = "; ".join(f"{names[i]}: {reason}" for i, reason in skipped.items()) or "no images were given"
        tips = "; ".join(dict.fromkeys(reason.tip for reason in skipped.values())) or "connect at least one photo"
        raise NoFaceError(f"no usable face in any reference image ({details}). To fix: {tips}.")
    return faces, rgb_images, skipped
