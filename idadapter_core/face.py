"""Face features of N reference images: insightface detection, alignment, ArcFace and CLIP (papers.md §1.3, §4.1).

The first step of every identity graph and of the trainer's data preparation, so it runs without ComfyUI:
the CLIP vision model is a callable (`ClipEncoder`) the host supplies. Per reference image: detect with the
model pack's SCRFD detector (trying smaller detection sizes when nothing is found), keep one face (the largest
by default), align it with insightface's `norm_crop` template for ArcFace (112x112) and with a wider square
crop on the same landmarks for CLIP (224x224). The ArcFace width is read from the recognizer (512 for
antelopev2/buffalo_l, 128 for the test stand-in), never assumed. Fewer than N usable images are filled up to
N by replication (the paper's inference, §1.3) or by flip / rotation / colour augmentation (its training
augmentation, §1.3 and §4.5).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from .errors import IDAdapterError

log = logging.getLogger(__name__)

FACE_MODEL_NAMES = ("antelopev2", "buffalo_l")
KNOWN_MODEL_FILES = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
"""The detector and recognizer files of the model packs users already have (the other .onnx files in these
packs, landmarks and gender/age, are not used)."""

PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCM": "ROCMExecutionProvider",
    "TensorRT": "TensorrtExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
    "MIGraphX": "MIGraphXExecutionProvider",
}
"""Short names shown to users -> onnxruntime execution provider names."""

FALLBACK_DET_SIZES = (640, 512, 384, 256, 160)
"""Detection sizes tried, below the chosen one, when no face is found: a face filling the frame (a close
crop) is often only found at a smaller size."""

CLIP_CROP_SIZE = 224
CLIP_CROP_SCALE = 1.5
"""[I] The CLIP crop shows 1.5x the width of the ArcFace crop around the same centre (hair, chin and jaw
in view), as IP-Adapter-FaceID-Plus and PhotoMaker give their CLIP encoders a looser face crop."""

FILL_MODES = ("replicate", "augment")

ClipEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(N, 224, 224, 3) RGB floats in [0, 1], channels last (a ComfyUI IMAGE) -> (penultimate-layer hidden
states (N, 1 + P, width) with the CLS token first, projected image embeddings (N, E))."""

ProgressFn = Callable[[int, int], None]
"""Called with (images done, images in all) after each reference image."""


class NoFaceError(IDAdapterError):
    """No usable face in any of the reference images."""


class FaceModelMissingError(IDAdapterError):
    """The insightface model folder is missing, incomplete or unreadable."""


class ImageFormatError(IDAdapterError):
    """An image array this module cannot turn into RGB."""


# ---------------------------------------------------------------------------------------------------------
# Model pack loading


def available_providers() -> list[str]:
    """Short names of the onnxruntime execution providers installed here, CPU first."""
    import onnxruntime

    installed = set(onnxruntime.get_available_providers())
    return [short for short, name in PROVIDERS.items() if name in installed]


def find_model_dir(roots: Sequence[str | Path] | str | Path, name: str) -> Path:
    """`<root>/models/<name>` holding the pack's .onnx files, in the first root that has it.

    The two common unzip mistakes are recognised and loaded with a warning that says where the files belong
    (`models/<name>/<name>/*.onnx`, and `<root>/<name>` without the `models` level); anything else raises
    `FaceModelMissingError` naming the exact folder and the file names insightface looks for.
    """
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    if not roots:
        raise FaceModelMissingError("no insightface model folder is configured")
    expected = roots[0] / "models" / name
    empty = None
    for root in roots:
        model_dir = root / "models" / name
        if model_dir.is_dir():
            if any(model_dir.glob("*.onnx")):
                return model_dir
            nested = model_dir / name
            if nested.is_dir() and any(nested.glob("*.onnx")):
                log.warning(
                    "InsightFace: '%s' is nested one level too deep: loading %s, but the .onnx files belong in %s "
                    "(other face packs will not find them there); move them up one folder.", name, nested, model_dir,
                )
                return nested
            empty = empty or model_dir
            continue
        flat = root / name
        if flat.is_dir() and any(flat.glob("*.onnx")):
            log.warning(
                "InsightFace: found '%s' at %s, but insightface looks in %s; loading it, but move the folder into "
                "'models' so other face packs find it too.", name, flat, model_dir,
            )
            return flat
    if empty is not None:
        raise FaceModelMissingError(
            f"the insightface folder {empty} has no .onnx files; {_expected_files(name)} "
            f"Unzip the '{name}' model pack so the .onnx files sit directly in {empty}."
        )
    found = sorted({p.name for root in roots if (root / "models").is_dir() for p in (root / "models").iterdir() if p.is_dir()})
    found_text = f" Model packs found: {', '.join(found)}." if found else ""
    others = f" (also searched: {', '.join(str(r / 'models') for r in roots[1:])})" if len(roots) > 1 else ""
    raise FaceModelMissingError(
        f"insightface model '{name}' not found: expected the folder {expected}{others}. {_expected_files(name)}"
        f"{found_text} This node never downloads models; put the unzipped pack there."
    )


def _expected_files(name: str) -> str:
    if name in KNOWN_MODEL_FILES:
        detector, recognizer = KNOWN_MODEL_FILES[name]
        return f"insightface loads every .onnx there and needs the detector {detector} and the recognizer {recognizer}."
    return (
        "insightface loads every .onnx there and needs a SCRFD face detector with keypoints and an ArcFace "
        "recognizer (e.g. scrfd_10g_bnkps.onnx + glintr100.onnx for antelopev2, det_10g.onnx + w600k_r50.onnx "
        "for buffalo_l)."
    )


def execution_providers(provider: str) -> list[str]:
    """onnxruntime providers for a short name, CPU last as the fallback; a provider that is not installed
    falls back to CPU with a warning."""
    import onnxruntime

    installed = onnxruntime.get_available_providers()
    name = PROVIDERS.get(provider, provider)
    if name == "CPUExecutionProvider":
        return ["CPUExecutionProvider"]
    if name not in installed:
        log.warning(
            "InsightFace: onnxruntime provider '%s' is not installed (installed: %s); running on CPU. For CUDA, "
            "install onnxruntime-gpu built for your CUDA version instead of onnxruntime.",
            provider, ", ".join(available_providers()),
        )
        return ["CPUExecutionProvider"]
    return [name, "CPUExecutionProvider"]


@dataclass(eq=False)
class FaceAnalyzer:
    """A loaded insightface model pack (its detector and recognizer) with the provider and detection size chosen.

    This is what travels as ComfyUI's FACE_ANALYSIS. `app` is insightface's own `FaceAnalysis`."""

    app: object
    name: str
    model_dir: Path
    provider: str
    det_size: int

    @property
    def detector(self):
        return self.app.models["detection"]

    @property
    def recognizer(self):
        return self.app.models["recognition"]

    @property
    def arcface_size(self) -> int:
        return int(self.recognizer.input_size[0])

    @property
    def embed_dim(self) -> int:
        """Width of the recognizer's embedding, read from its output."""
        width = self.recognizer.output_shape[-1]
        if isinstance(width, int):
            return width
        probe = np.zeros((self.arcface_size, self.arcface_size, 3), np.uint8)
        return int(self.recognizer.get_feat(probe).shape[-1])

    def detection_sizes(self) -> list[int]:
        return [self.det_size, *(s for s in FALLBACK_DET_SIZES if s < self.det_size)]

    def detect(self, image_rgb: np.ndarray, det_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (K, 5: x1 y1 x2 y2 score) and 5-point landmarks (K, 5, 2) in image pixels."""
        bgr = np.ascontiguousarray(image_rgb[..., ::-1])
        boxes, landmarks = self.detector.detect(bgr, input_size=(det_size, det_size), max_num=0)
        return boxes, landmarks

    def embed(self, arcface_crop_rgb: np.ndarray) -> np.ndarray:
        """L2-normalised ArcFace embedding (D,) of one aligned crop."""
        feature = self.recognizer.get_feat(np.ascontiguousarray(arcface_crop_rgb[..., ::-1]))[0].astype(np.float32)
        return feature / max(float(np.linalg.norm(feature)), 1e-12)


def load_face_analyzer(
    roots: Sequence[str | Path] | str | Path,
    name: str = "antelopev2",
    provider: str = "CPU",
    det_size: int = 640,
    det_thresh: float = 0.5,
) -> FaceAnalyzer:
    """Load `<root>/models/<name>` through insightface's `FaceAnalysis` (its own model routing), detector and
    recognizer only. Never downloads: a missing or incomplete folder raises `FaceModelMissingError`."""
    from insightface.app import FaceAnalysis

    if det_size % 32 or det_size < 64:
        raise IDAdapterError(f"detection size {det_size} must be a multiple of 32 and at least 64 (640 is the usual)")
    model_dir = find_model_dir(roots, name)
    providers = execution_providers(provider)
    files = sorted(p.name for p in model_dir.glob("*.onnx"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # An existing folder passed as `name` is used as is by every insightface version (no download path).
            app = FaceAnalysis(name=str(model_dir), allowed_modules=["detection", "recognition"], providers=providers)
    except AssertionError as err:  # FaceAnalysis asserts that a detector was found
        raise FaceModelMissingError(
            f"no face detector among {files} in {model_dir}; {_expected_files(name)}"
        ) from err
    except Exception as err:  # onnxruntime / onnx parse errors: a truncated download or not an ONNX file
        raise FaceModelMissingError(
            f"could not load the insightface models in {model_dir} ({type(err).__name__}: {err}). A file is probably "
            f"truncated or not an ONNX model; unzip the '{name}' pack again."
        ) from err
    if "recognition" not in app.models:
        raise FaceModelMissingError(f"no face recognizer among {files} in {model_dir}; {_expected_files(name)}")
    if not getattr(app.models["detection"], "use_kps", True):
        raise FaceModelMissingError(
            f"the detector in {model_dir} gives no facial landmarks, which alignment needs; use a SCRFD model with "
            "keypoints (the *_bnkps / det_10g files of antelopev2 / buffalo_l)."
        )
    app.prepare(ctx_id=0, det_thresh=det_thresh, det_size=(det_size, det_size))
    active = app.models["detection"].session.get_providers()[0]
    if active != providers[0]:
        log.warning("InsightFace: onnxruntime could not start %s and runs on %s", providers[0], active)
    short = next((s for s, n in PROVIDERS.items() if n == active), active)
    return FaceAnalyzer(app=app, name=name, model_dir=model_dir, provider=short, det_size=det_size)


# ---------------------------------------------------------------------------------------------------------
# Images


def to_rgb_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 RGB from grayscale, gray+alpha, RGB or RGBA; uint8, uint16 or floats in [0, 1]
    (a ComfyUI IMAGE). Transparent pixels are composited over white."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) < 1:
        raise ImageFormatError(f"expected an image (height, width, 1-4 channels), got shape {array.shape}")
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        values = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.floating):
        values = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise ImageFormatError(f"unsupported pixel type {array.dtype}; use uint8, uint16 or floats in [0, 1]")
    channels = values.shape[2]
    if channels in (2, 4):
        color, alpha = values[..., :-1], values[..., -1:]
        if alpha.max() > 0:  # an all-zero alpha channel is a broken export, not a fully transparent photo
            values = color * alpha + (1.0 - alpha)
        else:
            values = color
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return np.ascontiguousarray(np.round(values * 255.0).astype(np.uint8))


def load_image(path: str | Path) -> np.ndarray:
    """An image file as an array in its own depth (uint8, or uint16 for 16-bit grayscale), EXIF rotation applied;
    `to_rgb_uint8` then handles its channels."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode.startswith("I;16") or image.mode == "I":
            return np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
        if image.mode == "P":
            image = image.convert("RGBA")
        elif image.mode not in ("L", "LA", "RGB", "RGBA"):
            image = image.convert("RGB")
        return np.asarray(image)


def as_image_list(images: torch.Tensor | np.ndarray | Sequence) -> list:
    """A batch (B, H, W, C), one image (H, W, C) or a sequence of images -> a list of single images."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 3:
        return [images]
    return list(images)


# ---------------------------------------------------------------------------------------------------------
# Detection


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
) -> DetectedFace | str:
    """The chosen face of one image, or why there is none (a sentence).

    `face_index` None keeps the largest face; 0, 1, ... counts faces from the left. Detection sizes below the
    analyzer's are tried in turn until a face is found."""
    for det_size in analyzer.detection_sizes():
        boxes, landmarks = analyzer.detect(image_rgb, det_size)
        if len(boxes):
            break
    else:
        sizes = ", ".join(str(s) for s in analyzer.detection_sizes())
        return f"no face found (detection sizes {sizes} tried)"
    if face_index is None:
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        chosen = int(np.argmax(areas))
    else:
        left_to_right = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2, kind="stable")
        if face_index >= len(boxes):
            return f"face {face_index} asked for, but only {len(boxes)} face(s) found (counted from 0, left to right)"
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
        return f"face too small ({face.size:.0f} px, minimum {min_face_size} px); use a larger or closer photo"
    return face


def find_reference_faces(
    analyzer: FaceAnalyzer,
    images: torch.Tensor | np.ndarray | Sequence,
    face_index: int | None = None,
    min_face_size: int = 64,
    image_names: Sequence[str] | None = None,
    on_progress: ProgressFn | None = None,
) -> tuple[list[DetectedFace], list[np.ndarray], dict[int, str]]:
    """Detect one face per image. Returns the faces found, every image as RGB uint8, and the skipped images'
    indices with the reason. An image without a usable face is skipped with a warning naming it; only when no
    image is usable, `NoFaceError` lists them all."""
    images = as_image_list(images)
    names = list(image_names) if image_names is not None else [f"image {i + 1}/{len(images)}" for i in range(len(images))]
    faces: list[DetectedFace] = []
    rgb_images: list[np.ndarray] = []
    skipped: dict[int, str] = {}
    for index, image in enumerate(images):
        try:
            rgb = to_rgb_uint8(image)
        except ImageFormatError as err:
            rgb, result = None, str(err)
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
        raise NoFaceError(
            f"no usable face in any reference image ({details}). Try another detection size in Load InsightFace "
            "(smaller for close-up crops, larger for small faces in big photos), or crop the images closer to the face."
        )
    return faces, rgb_images, skipped


# ---------------------------------------------------------------------------------------------------------
# Alignment and filling up to N


@dataclass(frozen=True)
class Augmentation:
    """One training-style augmentation of a reference (papers.md §1.3: flipping, rotating, colour)."""

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
    """Exactly `num_refs` aligned references from the K faces found (papers.md §1.3).

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


# ---------------------------------------------------------------------------------------------------------
# Features


@dataclass
class FaceFeatures:
    """What Extract Face Features hands to Encode Identity: per-reference features of N references, plus where
    they came from. Encode Identity calls `adapter.encode(clip_patches[None], face_embeds[None],
    clip_image_embeds[None])`."""

    face_embeds: torch.Tensor
    """(N, D) float32, L2-normalised ArcFace embeddings f_a(i); D from the recognizer."""
    clip_patches: torch.Tensor
    """(N, P, W) float32 CLIP penultimate-layer patch tokens f_v(i), CLS dropped."""
    clip_image_embeds: torch.Tensor
    """(N, E) float32 CLIP projected image embeddings f_c(i)."""
    boxes: torch.Tensor
    """(K, 4) face boxes of the K user images used, in their pixels."""
    landmarks: torch.Tensor
    """(K, 5, 2) their 5-point landmarks."""
    source_indices: list[int]
    """Which input images the K faces came from."""
    face_model: str
    reference_sources: list[int] = field(default_factory=list)
    """For each of the N references, the input image it was made from."""
    augmentations: list[str] = field(default_factory=list)
    """For each of the N references, the augmentation applied ('' for none)."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Input images not used, with the reason."""

    @property
    def face_embed_dim(self) -> int:
        return int(self.face_embeds.shape[-1])

    @property
    def num_refs(self) -> int:
        return int(self.face_embeds.shape[0])


def _distinct(references: Sequence[AlignedReference]) -> tuple[list[AlignedReference], torch.Tensor]:
    """The distinct references (a replicated one is the same object) and, per reference, its position among them."""
    distinct: dict[int, AlignedReference] = {}
    for reference in references:
        distinct.setdefault(id(reference), reference)
    position = {key: i for i, key in enumerate(distinct)}
    return list(distinct.values()), torch.tensor([position[id(r)] for r in references])


def arcface_embeddings(analyzer: FaceAnalyzer, references: Sequence[AlignedReference]) -> torch.Tensor:
    """(N, D) L2-normalised ArcFace embeddings of the aligned crops (replicated references are computed once)."""
    distinct, index = _distinct(references)
    return torch.from_numpy(np.stack([analyzer.embed(r.arcface_crop) for r in distinct]))[index]


def clip_features(encode_clip: ClipEncoder, references: Sequence[AlignedReference]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP patch tokens (N, P, W) with CLS dropped and image embeddings (N, E) of the CLIP crops, in one batch.
    Replicated references are encoded once (with one photo and the paper's replication, CLIP runs once)."""
    distinct, index = _distinct(references)
    crops = torch.from_numpy(np.stack([r.clip_crop for r in distinct])).float() / 255.0
    hidden, image_embeds = encode_clip(crops)
    if hidden.ndim != 3 or hidden.shape[0] != len(distinct) or image_embeds.shape[0] != len(distinct):
        raise IDAdapterError(
            f"the CLIP encoder returned hidden states {tuple(hidden.shape)} and image embeds {tuple(image_embeds.shape)} "
            f"for {len(distinct)} crops; expected (N, 1 + patches, width) and (N, embed)"
        )
    patches = hidden[:, 1:].float().cpu()[index].contiguous()
    return patches, image_embeds.float().cpu().reshape(len(distinct), -1)[index]


def extract_face_features(
    analyzer: FaceAnalyzer,
    images: torch.Tensor | np.ndarray | Sequence,
    encode_clip: ClipEncoder,
    num_refs: int = 4,
    fill_mode: str = "replicate",
    face_index: int | None = None,
    min_face_size: int = 64,
    seed: int = 0,
    clip_crop_scale: float = CLIP_CROP_SCALE,
    image_names: Sequence[str] | None = None,
    on_progress: ProgressFn | None = None,
) -> tuple[FaceFeatures, list[AlignedReference]]:
    """Detect, align, fill up to `num_refs`, then ArcFace and CLIP: the whole first step of an identity
    (papers.md §4.1, inputs of the MFF). Returns the features and the aligned references (for previews)."""
    faces, rgb_images, skipped = find_reference_faces(analyzer, images, face_index, min_face_size, image_names, on_progress)
    references = align_references(rgb_images, faces, num_refs, fill_mode, seed, analyzer.arcface_size,
                                  clip_crop_scale=clip_crop_scale)
    used = [r.face for r in references[: min(len(faces), num_refs)]]
    clip_patches, clip_image_embeds = clip_features(encode_clip, references)
    features = FaceFeatures(
        face_embeds=arcface_embeddings(analyzer, references),
        clip_patches=clip_patches,
        clip_image_embeds=clip_image_embeds,
        boxes=torch.from_numpy(np.stack([f.box for f in used])),
        landmarks=torch.from_numpy(np.stack([f.landmarks for f in used])),
        source_indices=[f.source_index for f in used],
        face_model=analyzer.name,
        reference_sources=[r.face.source_index for r in references],
        augmentations=[r.augmentation.describe() if r.augmentation else "" for r in references],
        skipped=skipped,
    )
    return features, references


def draw_references(references: Sequence[AlignedReference], arcface_scale: float = CLIP_CROP_SCALE) -> np.ndarray:
    """(N, 224, 224, 3) uint8: each CLIP crop with its 5 landmarks and the ArcFace crop's square drawn on it."""
    colours = [(0, 255, 0), (0, 255, 0), (255, 64, 64), (64, 160, 255), (64, 160, 255)]
    out = []
    for reference in references:
        canvas = reference.clip_crop.copy()
        size = canvas.shape[0]
        inner = size / arcface_scale
        corner = int(round((size - inner) / 2))
        cv2.rectangle(canvas, (corner, corner), (size - 1 - corner, size - 1 - corner), (255, 255, 255), 1)
        for (x, y), colour in zip(reference.clip_landmarks, colours):
            cv2.circle(canvas, (int(round(x)), int(round(y))), 3, colour, -1, lineType=cv2.LINE_AA)
        out.append(canvas)
    return np.stack(out)


def clip_encoder_from_transformers(model, image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                                   image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)) -> ClipEncoder:
    """A `ClipEncoder` over a transformers `CLIPVisionModelWithProjection` (the trainer's host): resize to the
    model's input (bicubic, antialiased, as ComfyUI's clip_preprocess), normalise, run, take hidden_states[-2]."""
    size = int(model.config.image_size)
    parameter = next(model.parameters())
    mean = torch.tensor(image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_std).view(1, 3, 1, 1)

    @torch.no_grad()
    def encode(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = crops.movedim(-1, 1).float()
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
        pixels = ((pixels - mean) / std).to(device=parameter.device, dtype=parameter.dtype)
        out = model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2], out.image_embeds

    return encode
