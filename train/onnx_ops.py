"""The ONNX ops `train/onnx_to_torch.py` runs, each as a builder: an ONNX node (`NodeView`: its attributes and
constant inputs) -> a function of its input values with torch ops, ONNX's (numpy's) broadcasting and padding rules.
`OPOP_BUILDERS` maps op names to builders; `SUPPORTED_OPS` is what the converter runs (the table and `Constant`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from idadapter_core.errors import IDAdapterError

MIN_OPSET = 7

_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


class OnnxConversionError(IDAdapterError):
    """The ONNX model cannot be read or turned into a torch module."""


class UnsupportedOnnxOpError(OnnxConversionError):
    """The ONNX graph uses an op (or an attribute value) this converter does not implement."""


Value = torch.Tensor | None
Run = Callable[[list[Value]], "torch.Tensor | tuple[Value, ...]"]


@dataclass
class NodeView:
    """What an op builder sees of one node at conversion time."""

    proto: onnx.NodeProto
    index: int
    constants: dict[str, np.ndarray]

    @property
    def op(self) -> str:
        return self.proto.op_type

    @property
    def label(self) -> str:
        return f"node #{self.index} '{self.proto.name or 'unnamed'}' ({self.op})"

    @property
    def attrs(self) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in self.proto.attribute}

    def has_input(self, i: int) -> bool:
        return i < len(self.proto.input) and self.proto.input[i] != ""

    def static(self, i: int) -> np.ndarray | None:
        """The value of input `i` when it is a constant (initializer or Constant node), else None."""
        if not self.has_input(i):
            return None
        return self.constants.get(self.proto.input[i])

    def unsupported(self, what: str) -> UnsupportedOnnxOpError:
        return UnsupportedOnnxOpError(f"{self.label}: {what} is not supported by train/onnx_to_torch.py")


def _ints_input_or_attr(node: NodeView, index: int, attr: str) -> Callable[[list[Value]], list[int] | None]:
    """An int list given as attribute (older opsets) or as input `index` (constant, or computed at run time)."""
    attrs = node.attrs
    if attr in attrs:
        fixed = [int(v) for v in attrs[attr]]
        return lambda args: fixed
    static = node.static(index)
    if static is not None:
        fixed = [int(v) for v in static.reshape(-1)]
        return lambda args: fixed
    if not node.has_input(index):
        return lambda args: None
    return lambda args: [int(v) for v in args[index].reshape(-1).tolist()]


def _scalar_input_or_attr(node: NodeView, index: int, attr: str, default: float | None) -> Callable[[list[Value]], object]:
    """A scalar given as attribute (older opsets) or as input `index`: a python number when constant, else a tensor."""
    attrs = node.attrs
    if attr in attrs:
        fixed = attrs[attr]
        return lambda args: fixed
    static = node.static(index)
    if static is not None:
        fixed = static.reshape(-1)[0].item()
        return lambda args: fixed
    if not node.has_input(index):
        return lambda args: default
    return lambda args: args[index]


def _same_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Moves CPU meta tensors (shapes, indices, integer constants) to the device of the data they meet."""
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return list(tensors)
    target = next(d for d in devices if d.type != "cpu")
    return [t.to(target) for t in tensors]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---------------------------------------------------------------------------------------------------- padding

def _spatial_pads(node: NodeView, spatial_rank: int, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> Callable[[torch.Tensor], list[int]]:
    """ONNX's [begin_1..begin_n, end_1..end_n] for the spatial dims, from `pads` or `auto_pad`."""
    attrs = node.attrs
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = [int(p) for p in attrs.get("pads", [0] * 2 * spatial_rank)]
        return lambda x: pads
    if auto_pad == "VALID":
        return lambda x: [0] * 2 * spatial_rank
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise node.unsupported(f"auto_pad={auto_pad}")

    def same(x: torch.Tensor) -> list[int]:
        begins, ends = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins + ends

    return same


def _torch_pad_order(pads: Sequence[int]) -> list[int]:
    """ONNX [b_1..b_n, e_1..e_n] (first dim first) -> F.pad's (b_n, e_n, ..., b_1, e_1) (last dim first)."""
    n = len(pads) // 2
    out: list[int] = []
    for d in reversed(range(n)):
        out += [pads[d], pads[n + d]]
    return out


def _pool_geometry(node: NodeView, spatial_rank: int) -> tuple[list[int], list[int], list[int]]:
    attrs = node.attrs
    kernel = [int(k) for k in attrs["kernel_shape"]]
    strides = [int(s) for s in attrs.get("strides", [1] * spatial_rank)]
    dilations = [int(d) for d in attrs.get("dilations", [1] * spatial_rank)]
    return kernel, strides, dilations


# ---------------------------------------------------------------------------------------------------- op table

OP_BUILDERS: dict[str, Callable[[NodeView], Run]] = {}


def _op(*names: str):
    def register(builder: Callable[[NodeView], Run]) -> Callable[[NodeView], Run]:
        for name in names:
            OP_BUILDERS[name] = builder
        return builder

    return register


@_op("Conv")
def _conv(node: NodeView) -> Run:
    attrs = node.attrs
    weight = node.static(1)
    if "kernel_shape" in attrs:
        kernel = [int(k) for k in attrs["kernel_shape"]]
    elif weight is not None:
        kernel = list(weight.shape[2:])
    else:
        raise node.unsupported("a computed weight without kernel_shape")
    rank = len(kernel)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(rank)
    if conv is None:
        raise node.unsupported(f"a {rank}-d convolution")
    strides = [int(s) for s in attrs.get("strides", [1] * rank)]
    dilations = [int(d) for d in attrs.get("dilations", [1] * rank)]
    groups = int(attrs.get("group", 1))
    pads_of = _spatial_pads(node, rank, kernel, strides, dilations)

    def run(args: list[Value]) -> torch.Tensor:
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else None
        pads = pads_of(x)
        if pads[:rank] == pads[rank:]:
            return conv(x, w, b, strides, pads[:rank], dilations, groups)
        return conv(F.pad(x, _torch_pad_order(pads)), w, b, strides, 0, dilations, groups)

    return run


@_op("MaxPool")
def _max_pool(node: NodeView) -> Run:
    if len([o for o in node.proto.output if o]) > 1:
        raise node.unsupported("the Indices output of MaxPool")
    attrs = node.attrs
    rank = len(attrs["kernel_shape"])
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}.get(rank)
    if pool is None:
        raise node.unsupported(f"a {rank}-d pool")
    kernel, strides, dilations = _pool_geometry(node, rank)
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    pads_of = _spatial_pads(node, rank, kernel, strides, dilations)

    def run(args: list[Value]) -> torch.Tensor:
        x = args[0]
        pads = pads_of(x)
        if pads[:rank] == pads[rank:] and all(2 * p <= k for p, k in zip(pads[:rank], kernel)):
            return pool(x, kernel, strides, pads[:rank], dilations, ceil_mode)
        # torch pads symmetrically and at most half a kernel: pad explicitly with -inf, which no max picks
        x = F.pad(x, _torch_pad_order(pads), value=float("-inf"))
        return pool(x, kernel, strides, 0, dilations, ceil_mode)

    return run


@_op("AveragePool")
def _average_pool(node: NodeView) -> Run:
    attrs = node.attrs
    rank = len(attrs["kernel_shape"])
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}.get(rank)
    if pool is None:
        raise node.unsupported(f"a {rank}-d pool")
    kernel, strides, dilations = _pool_geometry(node, rank)
    if any(d != 1 for d in dilations):
        raise node.unsupported(f"dilations={dilations}")
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    count_include_pad = bool(attrs.get("count_include_pad", 0))
    pads_of = _spatial_pads(node, rank, kernel, strides, dilations)

    def run(args: list[Value]) -> torch.Tensor:
        x = args[0]
        pads = pads_of(x)
        if pads[:rank] == pads[rank:] and all(2 * p <= k for p, k in zip(pads[:rank], kernel)):
            return pool(x, kernel, strides, pads[:rank], ceil_mode, count_include_pad)
        if not count_include_pad and any(pads):
            raise node.unsupported(f"asymmetric or large pads {pads} with count_include_pad=0")
        return pool(F.pad(x, _torch_pad_order(pads)), kernel, strides, 0, ceil_mode, True)

    return run


@_op("GlobalAveragePool")
def _global_average_pool(node: NodeView) -> Run:
    return lambda args: args[0].mean(dim=tuple(range(2, args[0].dim())), keepdim=True)


@_op("BatchNormalization")
def _batch_norm(node: NodeView) -> Run:
    attrs = node.attrs
    if attrs.get("training_mode", 0):
        raise node.unsupported("training_mode=1")
    eps = float(attrs.get("epsilon", 1e-5))
    extra_outputs = len(node.proto.output) - 1

    def run(args: list[Value]):
        x, scale, bias, mean, var = args[:5]
        channels = x.shape[1]
        if scale.numel() == channels and mean.numel() == channels:
            y = F.batch_norm(x, mean.reshape(-1), var.reshape(-1), scale.reshape(-1), bias.reshape(-1), False, 0.0, eps)
        else:  # opset < 9 with spatial=0: statistics per activation, shaped like one sample (C, D1, ...)
            y = (x - mean) / torch.sqrt(var + eps) * scale + bias
        # inference: the optional running-statistics outputs are the unchanged inputs
        return (y, mean, var, mean, var)[: 1 + extra_outputs]

    return run


@_op("PRelu")
def _prelu(node: NodeView) -> Run:
    def run(args: list[Value]) -> torch.Tensor:
        x, slope = args
        # one slope per channel (insightface's (C,) on (N, C), (C, 1, 1) on (N, C, H, W)) or a single one: torch's
        # fused kernel, 0.2-0.6x the time of the general form below forward + backward; numpy broadcasting else
        aligned = [1] * (x.dim() - slope.dim()) + list(slope.shape)
        if (x.dim() >= 2 and x.is_floating_point() and len(aligned) == x.dim() and aligned[1] in (1, x.shape[1])
                and all(s == 1 for i, s in enumerate(aligned) if i != 1)):
            return F.prelu(x, slope.reshape(-1))
        return torch.where(x >= 0, x, x * slope)

    return run


@_op("Relu")
def _relu(node: NodeView) -> Run:
    return lambda args: F.relu(args[0])


@_op("Sigmoid")
def _sigmoid(node: NodeView) -> Run:
    return lambda args: torch.sigmoid(args[0])


@_op("Tanh")
def _tanh(node: NodeView) -> Run:
    return lambda args: torch.tanh(args[0])


@_op("Clip")
def _clip(node: NodeView) -> Run:
    low_of = _scalar_input_or_attr(node, 1, "min", None)
    high_of = _scalar_input_or_attr(node, 2, "max", None)

    def run(args: list[Value]) -> torch.Tensor:
        low, high = low_of(args), high_of(args)
        if low is None and high is None:
            return args[0]
        if isinstance(low, float) and isinstance(high, float) and low <= high and args[0].is_floating_point():
            return F.hardtanh(args[0], low, high)  # ReLU6 and co.: forward + backward 0.1-0.2x clamp's time
        return torch.clamp(args[0], low, high)

    return run


def _binary(node: NodeView, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Run:
    def run(args: list[Value]) -> torch.Tensor:
        return combine(*_same_device(args[0], args[1]))

    return run


def _divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@_op("Add")
def _add(node: NodeView) -> Run:
    return _binary(node, torch.add)


@_op("Sub")
def _sub(node: NodeView) -> Run:
    return _binary(node, torch.sub)


@_op("Mul")
def _mul(node: NodeView) -> Run:
    return _binary(node, torch.mul)


@_op("Div")
def _div(node: NodeView) -> Run:
    return _binary(node, _divide)


@_op("MatMul")
def _matmul(node: NodeView) -> Run:
    return _binary(node, torch.matmul)


@_op("Gemm")
def _gemm(node: NodeView) -> Run:
    attrs = node.attrs
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))

    def run(args: list[Value]) -> torch.Tensor:
        a, b = args[0], args[1]
        c = args[2] if len(args) > 2 else None
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if alpha != 1.0:
            y = alpha * y
        if c is not None:
            y = y + (beta * c if beta != 1.0 else c)
        return y

    return run


@_op("Flatten")
def _flatten(node: NodeView) -> Run:
    axis = int(node.attrs.get("axis", 1))

    def run(args: list[Value]) -> torch.Tensor:
        x = args[0]
        split = _axis(axis, x.dim())
        return x.reshape(math.prod(x.shape[:split]), math.prod(x.shape[split:]))

    return run


@_op("Reshape")
def _reshape(node: NodeView) -> Run:
    shape_of = _ints_input_or_attr(node, 1, "shape")
    allow_zero = bool(node.attrs.get("allowzero", 0))

    def run(args: list[Value]) -> torch.Tensor:
        x = args[0]
        shape = shape_of(args)
        if not allow_zero:  # 0 copies the input's dimension
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)

    return run


@_op("Transpose")
def _transpose(node: NodeView) -> Run:
    perm = node.attrs.get("perm")

    def run(args: list[Value]) -> torch.Tensor:
        x = args[0]
        return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))

    return run


@_op("Concat")
def _concat(node: NodeView) -> Run:
    axis = int(node.attrs["axis"])

    def run(args: list[Value]) -> torch.Tensor:
        parts = _same_device(*[a for a in args if a is not None])
        return torch.cat(parts, dim=_axis(axis, parts[0].dim()))

    return run


@_op("Identity")
def _identity(node: NodeView) -> Run:
    return lambda args: args[0]


@_op("Dropout")
def _dropout(node: NodeView) -> Run:
    """Inference: the identity, and an all-true mask when the graph asks for it."""
    if len(node.proto.output) > 1 and node.proto.output[1]:
        return lambda args: (args[0], torch.ones_like(args[0], dtype=torch.bool))
    return lambda args: args[0]


@_op("Shape")
def _shape(node: NodeView) -> Run:
    attrs = node.attrs
    start, end = attrs.get("start", 0), attrs.get("end")
    return lambda args: torch.tensor(list(args[0].shape)[start:end], dtype=torch.int64)


@_op("Gather")
def _gather(node: NodeView) -> Run:
    axis = int(node.attrs.get("axis", 0))

    def run(args: list[Value]) -> torch.Tensor:
        data, indices = _same_device(args[0], args[1].long())
        dim = _axis(axis, data.dim())
        indices = torch.where(indices < 0, indices + data.shape[dim], indices)
        picked = torch.index_select(data, dim, indices.reshape(-1))
        return picked.reshape((*data.shape[:dim], *indices.shape, *data.shape[dim + 1:]))

    return run


@_op("Unsqueeze")
def _unsqueeze(node: NodeView) -> Run:
    axes_of = _ints_input_or_attr(node, 1, "axes")

    def run(args: list[Value]) -> torch.Tensor:
        x = args[0]
        axes = axes_of(args)
        for axis in sorted(_axis(a, x.dim() + len(axes)) for a in axes):
            x = x.unsqueeze(axis)
        return x

    return run


@_op("Squeeze")
def _squeeze(node: NodeView) -> Run:
    axes_of = _ints_input_or_attr(node, 1, "axes")

    def run(args: list[Value]) -> torch.Tensor:
        x = args[0]
        axes = axes_of(args)
        if axes is None:
            return x.squeeze()
        return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))

    return run


@_op("Pad")
def _pad(node: NodeView) -> Run:
    attrs = node.attrs
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise node.unsupported(f"mode={mode}")
    pads_of = _ints_input_or_attr(node, 1, "pads")
    value_of = _scalar_input_or_attr(node, 2, "value", 0.0)
    axes_of = _ints_input_or_attr(node, 3, "axes")

    def run(args: list[Value]) -> torch.Tensor:
        x = args[0]
        pads, axes = pads_of(args), axes_of(args)
        if axes is not None:  # opset 18: pads only for the listed axes
            full = [0] * 2 * x.dim()
            for i, axis in enumerate(_axis(a, x.dim()) for a in axes):
                full[axis], full[x.dim() + axis] = pads[i], pads[len(axes) + i]
            pads = full
        order = _torch_pad_order(pads)
        while len(order) > 2 and order[-2:] == [0, 0]:  # torch pads at most the last dims a mode allows
            order = order[:-2]
        if torch_mode == "constant":
            value = value_of(args)
            return F.pad(x, order, value=float(value) if value is not None else 0.0)
        return F.pad(x, order, mode=torch_mode)

    return run


@_op("Cast")
def _cast(node: NodeView) -> Run:
    to = int(node.attrs["to"])
    if to not in _TORCH_DTYPES:
        raise node.unsupported(f"Cast to {onnx.TensorProto.DataType.Name(to)}")
    dtype = _TORCH_DTYPES[to]
    return lambda args: args[0].to(dtype)


SUPPORTED_OPS = frozenset(OP_BUILDERS) | {"Constant"}
