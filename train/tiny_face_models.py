"""A tiny insightface model pack and synthetic "face" images for the demo and the tests: ONNX models exported with
torch in the exact input/output layout insightface routes, so its own loading, decoding, NMS and alignment run
unchanged (nothing is downloaded).

`TinySquareDetector` has SCRFD's layout (one image input with dynamic height/width; 9 outputs: scores, box distances
and 5 keypoints for strides 8, 16, 32 with 2 anchors each), so insightface's `ModelRouter` makes it an SCRFD. What it
"detects" is synthetic: a pure-red square of side 4*stride, centred on a multiple of the stride (in the detector's
input pixels), is found at exactly that stride, with its box on the square and the 5 landmarks on insightface's
ArcFace template scaled to the square. So faces of known sizes go where a caller wants them. With `measure="colour"`
the square may be of any strongly coloured pixels (chroma, max - min channel: from 0.4 of full scale on it counts
fully, under 0.15 not at all) on a greyish surround: faces whose every region is an identity attribute
(train/miniature.py).

`TinyRecognizer` has ArcFace's layout (static 1x3x112x112 input, one 1xD output), with random weights here: images
whose aligned crops look alike get similar embeddings, which is all an identity means here (train/miniature.py
trains one to tell its people apart).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

STRIDES = (8, 16, 32)
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float32
)
# Landmarks in stride units around the anchor: the square's +-2 strides span the 112 px ArcFace frame.
LANDMARKS_IN_STRIDES = (ARCFACE_TEMPLATE - 56.0) / 28.0


FACE_MEASURES = ("red", "colour")
"""What makes a pixel "face" for the tiny detector: pure red, or any strong colour (see the module docstring)."""


class TinySquareDetector(nn.Module):
    def __init__(self, measure: str = "red") -> None:
        super().__init__()
        if measure not in FACE_MEASURES:
            raise ValueError(f"measure must be one of {FACE_MEASURES}, got '{measure}'")
        self.measure = measure
        self.register_buffer("box_distances", torch.full((1, 4), 2.0))
        self.register_buffer("landmark_offsets", torch.from_numpy(LANDMARKS_IN_STRIDES.reshape(1, 10).copy()))

    @staticmethod
    def window_mean(redness: torch.Tensor, stride: int, window: int) -> torch.Tensor:
        """Mean redness in a `window` square centred on every anchor (anchors sit at multiples of `stride`)."""
        half = window // 2
        padded = nn.functional.pad(redness, (half, half - stride, half, half - stride))
        return nn.functional.avg_pool2d(padded, window, stride)

    def face_likeness(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1]. insightface feeds (pixel - 127.5) / 128 in RGB order; pure red is (1, -1, -1)."""
        red, green, blue = image[:, 0:1], image[:, 1:2], image[:, 2:3]
        if self.measure == "red":
            return torch.clamp((red - torch.maximum(green, blue)) / 1.99, 0.0, 1.0)
        chroma = torch.maximum(torch.maximum(red, green), blue) - torch.minimum(torch.minimum(red, green), blue)
        return torch.clamp((chroma - 0.3) / 0.5, 0.0, 1.0)  # chroma is in [0, 2] here

    def forward(self, image: torch.Tensor):
        redness = self.face_likeness(image)
        scores, boxes, landmarks = [], [], []
        for stride in STRIDES:
            # centre-surround: the 4-stride window full of red, the 8-stride window around it not
            inner = self.window_mean(redness, stride, 4 * stride)
            outer = self.window_mean(redness, stride, 8 * stride)
            score = torch.sigmoid(30.0 * (inner - outer - 0.6))
            score = score.permute(0, 2, 3, 1).reshape(-1, 1).repeat(1, 2).reshape(-1, 1)  # 2 anchors per position
            scores.append(score)
            boxes.append(score * 0.0 + self.box_distances)
            landmarks.append(score * 0.0 + self.landmark_offsets)
        return (*scores, *boxes, *landmarks)


class TinyRecognizer(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.fc = nn.Linear(8 * 14 * 14, embed_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(image)).flatten(1))


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, **options) -> Path:
    """torch's TorchScript-based exporter at opset 17 (the new dynamo exporter needs onnxscript and names outputs
    its own way); its deprecation notice and its notes on constant folding are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, DeprecationWarning))
        torch.onnx.export(model.eval(), (example,), str(path), opset_version=17, dynamo=False, **options)
    return path


def export_detector(path: Path, measure: str = "red") -> Path:
    outputs = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in STRIDES]
    return _export_onnx(
        TinySquareDetector(measure), torch.zeros(1, 3, 64, 64), path, input_names=["input"], output_names=outputs,
        dynamic_axes={"input": {2: "height", 3: "width"}, **{name: {0: f"{name}_rows"} for name in outputs}},
    )


def export_recognizer_model(model: TinyRecognizer, path: Path) -> Path:
    return _export_onnx(model, torch.zeros(1, 3, 112, 112), path, input_names=["data"], output_names=["embedding"])


def export_recognizer(path: Path, embed_dim: int = 64, seed: int = 0) -> Path:
    """A recognizer with random weights (drawn from `seed`)."""
    torch.manual_seed(seed)
    return export_recognizer_model(TinyRecognizer(embed_dim), path)


def write_model_pack(root: Path, name: str = "tiny_pack", embed_dim: int = 64, detector: bool = True,
                     recognizer: bool = True, face_measure: str = "red") -> Path:
    """`<root>/models/<name>/` with the tiny detector (finding `face_measure` squares) and/or recognizer, the layout
    insightface loads."""
    folder = root / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    if detector:
        export_detector(folder / "det_tiny.onnx", face_measure)
    if recognizer:
        export_recognizer(folder / "rec_tiny.onnx", embed_dim)
    return folder


def square_faces_image(size: tuple[int, int], faces: list[tuple[int, int, int]], background: int = 128,
                       seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB with pure-red squares ("faces") given as (centre x, centre y, side), each with
    three coloured marks (5% of its area) placed from `seed`, so different seeds give different "people"."""
    rng = np.random.default_rng(seed)
    image = np.full((size[1], size[0], 3), background, np.uint8)
    for cx, cy, side in faces:
        x0, y0 = cx - side // 2, cy - side // 2
        image[y0:y0 + side, x0:x0 + side] = (255, 0, 0)
        mark = side // 8
        for _ in range(3):
            mx, my = rng.integers(0, side - mark, size=2)
            image[y0 + my:y0 + my + mark, x0 + mx:x0 + mx + mark] = rng.integers(0, 256, size=3)
    return image


SYNTHETIC_IMAGE_SIZE = 320
"""Side of the synthetic photos; at detection size 320 the detector sees them pixel for pixel."""


def write_synthetic_identities(folder: Path, identities: int = 3, images_per_identity: int = 3,
                               caption: str = "a portrait photo of a person") -> dict[str, list[Path]]:
    """`folder/<identity>/<i>.png` (+ a same-name .txt caption): per identity, photos of one "face" (a 128 px red
    square with the identity's own marks) at different places on different backgrounds, which the tiny detector
    finds at stride 32. Returns the files per identity."""
    side, step = 128, 32
    centres = [(160 + dx, 160 + dy) for dy in (-step, 0, step) for dx in (-step, 0, step)]
    written: dict[str, list[Path]] = {}
    for person in range(identities):
        name = f"person{person + 1}"
        (folder / name).mkdir(parents=True, exist_ok=True)
        written[name] = []
        for index in range(images_per_identity):
            centre = centres[(person * 5 + index * 4) % len(centres)]
            background = 60 + 50 * ((person + index) % 4)
            pixels = square_faces_image((SYNTHETIC_IMAGE_SIZE,) * 2, [(*centre, side)], background, seed=1000 + person)
            path = folder / name / f"{index}.png"
            Image.fromarray(pixels).save(path)
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
            written[name].append(path)
    return written
