"""insightface model packs: where they live, which files they need, and loading them (detector + recognizer only).

The folder layout is the one the IPAdapter FaceID, InstantID and PuLID packs use (`<root>/models/<name>/*.onnx`),
so users share one copy. Nothing is ever downloaded: a missing or incomplete folder raises `FaceModelMissingError`
naming the exact folder and files.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import FaceModelMissingError, IDAdapterError

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


def as_face_analyzer(face_analysis: object) -> FaceAnalyzer:
    """What ComfyUI's shared FACE_ANALYSIS socket carries, as a FaceAnalyzer.

    The socket type is ComfyUI's, so another pack's face model can be connected to it. Ours passes through; an
    insightface `FaceAnalysis` prepared by another pack is wrapped, provided it has a detector with landmarks and
    a recognizer (the two models alignment and ArcFace need). Anything else is refused with a message."""
    if isinstance(face_analysis, FaceAnalyzer):
        return face_analysis
    models = getattr(face_analysis, "models", None)
    if not isinstance(models, dict):
        raise IDAdapterError(
            f"face_analysis is a {type(face_analysis).__name__}, not an insightface model; connect IDAdapter's "
            "Load InsightFace (or another pack's insightface FaceAnalysis)."
        )
    missing = [task for task in ("detection", "recognition") if task not in models]
    if missing:
        raise IDAdapterError(
            f"the connected insightface model has no {' or '.join(missing)} model (it has: {', '.join(sorted(models))}); "
            "IDAdapter needs a face detector and an ArcFace recognizer. Use IDAdapter's Load InsightFace."
        )
    if not getattr(models["detection"], "use_kps", True):
        raise IDAdapterError("the connected insightface detector gives no facial landmarks, which alignment needs; "
                             "use a SCRFD model with keypoints (antelopev2 / buffalo_l).")
    model_dir = Path(getattr(face_analysis, "model_dir", "") or ".")
    det_size = getattr(face_analysis, "det_size", None) or (640, 640)
    session = getattr(models["detection"], "session", None)
    active = session.get_providers()[0] if session is not None else PROVIDERS["CPU"]
    short = next((s for s, n in PROVIDERS.items() if n == active), active)
    return FaceAnalyzer(app=face_analysis, name=model_dir.name, model_dir=model_dir, provider=short, det_size=int(det_size[0]))
