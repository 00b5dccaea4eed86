"""insightface's ArcFace recognizer as a differentiable torch module, for the face-ID loss (DESIGN.md §2.5).

L_id = 1 - cos(R(x0_hat), f_a) needs gradients through R, the same ArcFace that gave the reference features f_a.
`ArcFaceTorch.from_onnx(path)` converts the user's insightface ONNX file (glintr100.onnx, w600k_r50.onnx, ...)
with train/onnx_to_torch.py and reproduces insightface's `ArcFaceONNX.get_feat` on the same pixels: the same
input normalisation (detected from the first nodes' names exactly as insightface does: mxnet-converted graphs
that start with Sub and Mul nodes take raw 0..255 pixels, all others (pixel - 127.5) / 127.5) and the same
channel order (get_feat takes BGR and swaps to RGB; this module takes RGB, so it feeds the same tensor).
"""
from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from idadapter_core.errors import IDAdapterError

from .onnx_to_torch import OnnxConversionError, OnnxGraphModule, convert_onnx, load_onnx_model


def insightface_input_normalisation(model: onnx.ModelProto) -> tuple[float, float]:
    """(input_mean, input_std) as `insightface.model_zoo.arcface_onnx.ArcFaceONNX.__init__` picks them."""
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    has_mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class ArcFaceTorch(nn.Module):
    """(B, 3, H, W) RGB floats in [0, 1] -> raw (not normalised) ArcFace embeddings (B, embed_dim).

    Equals `ArcFaceONNX.get_feat(bgr_uint8)` for the same pixels, up to float rounding. insightface's graphs have a
    static batch of 1 (some even bake the 1 into Reshape constants), so the graph runs once per sample under
    `torch.func.vmap`, which batches its ops. Inputs are cast to the weights' dtype. Nothing is trainable."""

    def __init__(self, graph: OnnxGraphModule, input_mean: float, input_std: float) -> None:
        super().__init__()
        if len(graph.input_names) != 1 or len(graph.output_names) != 1:
            raise OnnxConversionError(
                f"an ArcFace recognizer has one input and one output; this graph has inputs {graph.input_names} and "
                f"outputs {graph.output_names}. Pass the recognizer file (e.g. glintr100.onnx), not the detector."
            )
        shape = graph.input_shapes[0]
        if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or not isinstance(shape[3], int):
            raise OnnxConversionError(
                f"an ArcFace recognizer takes a static (1, 3, H, W) image; this graph's input is {shape}"
            )
        self.graph = graph
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        self.input_size: tuple[int, int] = (shape[3], shape[2])
        """(width, height), insightface's order (112, 112)."""
        width = graph.output_shapes[0][-1] if graph.output_shapes[0] else None
        if not isinstance(width, int) or width <= 0:
            with torch.no_grad():
                width = int(self(torch.zeros(1, 3, shape[2], shape[3])).shape[-1])
        self.embed_dim: int = width

    @classmethod
    def from_onnx(cls, path_or_model: str | Path | onnx.ModelProto) -> "ArcFaceTorch":
        model = load_onnx_model(path_or_model)
        return cls(convert_onnx(model), *insightface_input_normalisation(model))

    def _embed_one(self, blob: torch.Tensor) -> torch.Tensor:
        return self.graph(blob.unsqueeze(0)).reshape(-1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        width, height = self.input_size
        if rgb.dim() != 4 or tuple(rgb.shape[1:]) != (3, height, width):
            raise IDAdapterError(
                f"ArcFace takes aligned RGB crops of shape (B, 3, {height}, {width}) in [0, 1], got "
                f"{tuple(rgb.shape)}; align faces with insightface's template (idadapter_core.face.arcface_matrix) first"
            )
        # cv2.dnn.blobFromImages: (pixel - mean) * (1 / std), pixels 0..255, RGB after its swapRB
        blob = (rgb.to(self.graph.float_dtype) * 255.0 - self.input_mean) * (1.0 / self.input_std)
        return torch.func.vmap(self._embed_one)(blob)
