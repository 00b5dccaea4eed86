"""An ONNX graph as a differentiable torch module, op by op (for the trainer's face-ID loss, DESIGN.md §2.5).

The face-ID loss backpropagates through ArcFace, and users have ArcFace only as insightface's ONNX files
(antelopev2 glintr100 = IResNet-100, buffalo_l w600k_r50 = IResNet-50, MobileFaceNets, older mxnet-converted
models). onnx2torch 1.5.15 (bench/onnx_converters.py) gives the same embeddings and bitwise the same input gradients
on insightface's layouts, but it imports torchvision, and PyPI's torchvision does not load beside the CPU torch
2.13.0 wheel (0.28.0: "operator torchvision::nms does not exist"; 0.29.x needs torch >= 2.14, a 5.5 GB CUDA
build); it also lacks opset-7/8 BatchNormalization and Dropout (mxnet-converted recognizers), SAME_* conv padding
and asymmetric AveragePool padding, and silently mis-converts Pad-10's `value` and a Dropout with a mask output.
So this is our own small converter: the graph's nodes run in graph order with torch ops, with ONNX's (numpy's)
broadcasting.

Weights and float constants become non-persistent buffers (they follow `.to(device / dtype)`, nothing is
trainable, the ONNX file stays the one source of truth, so `state_dict()` is empty: our choice). Integer and bool
constants (shapes, axes, indices) stay CPU tensors beside the module, like the outputs of `Shape`, so shape
arithmetic never waits on an accelerator. BatchNormalization always uses its running statistics (inference), and
Dropout is the identity, whatever the module's train/eval flag.

Supported: the ops of the ops table (train/onnx_ops.py, `SUPPORTED_OPS`), default domain, opset 7 and newer. Anything else
raises `UnsupportedOnnxOpError` naming the op and the node.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .onnx_ops import (
    MIN_OPSET, OP_BUILDERS, SUPPORTED_OPS, NodeView, OnnxConversionError, Run, UnsupportedOnnxOpError,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- the module

def _constant_node_value(node: NodeView) -> np.ndarray:
    attrs = node.attrs
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                        ("value_ints", np.int64)):
        if name in attrs:
            return np.array(attrs[name], dtype=dtype)
    raise node.unsupported(f"a Constant with attributes {sorted(attrs)}")


def _static_shape(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


@dataclass
class _Step:
    label: str
    inputs: list[str]
    outputs: list[str]
    run: Run


class OnnxGraphModule(nn.Module):
    """One ONNX graph run node by node with torch ops; differentiable w.r.t. its inputs, nothing trainable.

    `forward(*inputs)` takes the graph's inputs in order (`input_names`) and returns its output, or a tuple
    when the graph has several (`output_names`). `input_shapes` / `output_shapes` are the declared shapes
    (None for a dynamic dimension)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None or opset < MIN_OPSET:
            raise OnnxConversionError(
                f"the model uses ONNX opset {opset}; this converter needs opset {MIN_OPSET} or newer. Upgrade it with "
                "onnx.version_converter.convert_version(model, 13) and save it again."
            )
        constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in constants]
        self.input_shapes = [_static_shape(i) for i in graph.input if i.name not in constants]
        self.output_names = [o.name for o in graph.output]
        self.output_shapes = [_static_shape(o) for o in graph.output]
        self.opset = opset

        self._steps: list[_Step] = []
        for index, proto in enumerate(graph.node):
            node = NodeView(proto, index, constants)
            if proto.domain not in ("", "ai.onnx"):
                raise UnsupportedOnnxOpError(
                    f"{node.label}: op '{proto.op_type}' of domain '{proto.domain}' is not supported by "
                    "train/onnx_to_torch.py (only standard ONNX ops are; a model optimised by onnxruntime for one "
                    "machine contains such fused ops, so use the original file)"
                )
            if proto.op_type == "Constant":
                constants[proto.output[0]] = _constant_node_value(node)
                continue
            builder = OP_BUILDERS.get(proto.op_type)
            if builder is None:
                raise UnsupportedOnnxOpError(
                    f"{node.label}: op '{proto.op_type}' is not supported by train/onnx_to_torch.py (supported: "
                    f"{', '.join(sorted(SUPPORTED_OPS))}); add it there"
                )
            self._steps.append(_Step(node.label, list(proto.input), list(proto.output), builder(node)))

        self._buffer_of: dict[str, str] = {}
        self._meta_constants: dict[str, torch.Tensor] = {}
        for i, (name, value) in enumerate(constants.items()):
            tensor = torch.from_numpy(np.array(value))  # a writable copy
            if tensor.is_floating_point():
                self._buffer_of[name] = f"constant_{i}"
                self.register_buffer(f"constant_{i}", tensor, persistent=False)
            else:
                self._meta_constants[name] = tensor
        log.debug("ONNX graph converted: %d nodes, %d constants, opset %d", len(self._steps), len(constants), opset)

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype of the float weights (what `.to(dtype)` last set)."""
        return next((b.dtype for b in self.buffers()), torch.float32)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise OnnxConversionError(
                f"the graph takes {len(self.input_names)} input(s) {self.input_names}, {len(inputs)} were given"
            )
        values: dict[str, torch.Tensor] = dict(self._meta_constants)
        values.update({name: getattr(self, buffer) for name, buffer in self._buffer_of.items()})
        values.update(zip(self.input_names, inputs))
        for step in self._steps:
            args = [values[name] if name else None for name in step.inputs]
            try:
                outputs = step.run(args)
            except RuntimeError as err:
                err.add_note(f"while running ONNX {step.label}")
                raise
            if isinstance(outputs, torch.Tensor):
                outputs = (outputs,)
            for name, value in zip(step.outputs, outputs):
                if name:
                    values[name] = value
        results = tuple(values[name] for name in self.output_names)
        return results[0] if len(results) == 1 else results


def load_onnx_model(path_or_model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """The ModelProto, read from a file when given a path (its external data, if any, beside it)."""
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    path = Path(path_or_model)
    if not path.is_file():
        raise OnnxConversionError(f"no ONNX file at {path}; check the path to the recognizer (e.g. glintr100.onnx)")
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf decode errors: a truncated download or not an ONNX file
        raise OnnxConversionError(
            f"{path} is not a readable ONNX model ({type(err).__name__}: {err}); the file is probably truncated, "
            "download or unzip it again"
        ) from err


def convert_onnx(path_or_model: str | Path | onnx.ModelProto) -> OnnxGraphModule:
    """The ONNX model (file or ModelProto) as a torch module that runs its graph; see the module docstring."""
    return OnnxGraphModule(load_onnx_model(path_or_model))
