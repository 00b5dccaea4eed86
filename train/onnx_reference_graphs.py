"""Small ONNX graphs the ONNX->torch converter (train/onnx_to_torch.py) is checked on against onnxruntime, by
tests/test_arcface_torch.py and bench/onnx_converters.py: one graph per op and attribute form insightface's
recognizers use (asymmetric and SAME_* padding, opset-8/10 attribute forms, computed reshapes, ...), and an older
mxnet-converted recognizer's layout."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

N = helper.make_node


def onnx_model(nodes, input_shape, output_shape, initializers=(), opset=17, input_name="x",
               output_name="y") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "ops", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


SINGLE_OP_GRAPHS = {
    "conv asymmetric pads, dilation, groups": lambda: onnx_model(
        [N("Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 2, 1], dilations=[2, 1], group=2, strides=[1, 2])],
        [1, 4, 9, 9], None, [("w", rand(6, 2, 3, 3)), ("b", rand(6, seed=1))]),
    "conv SAME_UPPER": lambda: onnx_model(
        [N("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])], [1, 4, 10, 9], None,
        [("w", rand(3, 4, 4, 4))]),
    "pad reflect / edge / constant": lambda: onnx_model(
        [N("Pad", ["x", "p"], ["a"], mode="reflect"), N("Pad", ["a", "p"], ["e"], mode="edge"),
         N("Pad", ["e", "p", "v"], ["y"])], [1, 2, 5, 6], None,
        [("p", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)), ("v", np.array(1.5, np.float32))]),
    "pad opset 10 attributes": lambda: onnx_model(
        [N("Pad", ["x"], ["y"], pads=[0, 0, 1, 0, 0, 1, 0, 2], value=-2.0)], [1, 2, 4, 4], None, opset=10),
    "maxpool asymmetric pads, ceil": lambda: onnx_model(
        [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1)],
        [1, 3, 10, 11], None),
    "averagepool with and without pad counting": lambda: onnx_model(
        [N("AveragePool", ["x"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         N("AveragePool", ["a"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 0, 0, 1], count_include_pad=1)],
        [1, 3, 8, 8], None),
    "global pool, flatten, gemm alpha beta": lambda: onnx_model(
        [N("GlobalAveragePool", ["x"], ["g"]), N("Flatten", ["g"], ["f"]),
         N("Gemm", ["f", "w", "c"], ["y"], alpha=0.5, beta=2.0)], [1, 6, 5, 5], None,
        [("w", rand(6, 4)), ("c", rand(4, seed=1))]),
    "gemm transA": lambda: onnx_model(
        [N("Reshape", ["x", "s"], ["r"]), N("Gemm", ["r", "w"], ["y"], transA=1, transB=1)], [1, 12], None,
        [("s", np.array([3, 4], np.int64)), ("w", rand(5, 3))]),
    "computed reshape via Shape/Gather/Unsqueeze/Concat": lambda: onnx_model(
        [N("Shape", ["x"], ["shape"]), N("Gather", ["shape", "zero"], ["batch"], axis=0),
         N("Unsqueeze", ["batch", "axes"], ["b1"]), N("Concat", ["b1", "minus_one"], ["target"], axis=0),
         N("Reshape", ["x", "target"], ["flat"]), N("Sigmoid", ["flat"], ["s"]), N("Sub", ["s", "half"], ["d"]),
         N("Div", ["d", "two"], ["q"]), N("Relu", ["q"], ["y"])], [1, 2, 3, 4], None,
        [("zero", np.array(0, np.int64)), ("axes", np.array([0], np.int64)), ("minus_one", np.array([-1], np.int64)),
         ("half", np.array(0.5, np.float32)), ("two", rand(24, seed=2))]),
    "reshape 0, transpose, gather index -1, squeeze": lambda: onnx_model(
        [N("Reshape", ["x", "s"], ["r"]), N("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
         N("Gather", ["t", "i"], ["g"], axis=2), N("Squeeze", ["g", "axes"], ["y"])], [1, 2, 6], None,
        [("s", np.array([0, 3, 4], np.int64)), ("i", np.array([[-1]], np.int64)), ("axes", np.array([-1], np.int64))]),
    "opset 10 squeeze, unsqueeze, clip attributes": lambda: onnx_model(
        [N("Unsqueeze", ["x"], ["u"], axes=[0, 3]), N("Squeeze", ["u"], ["s"], axes=[0]),
         N("Clip", ["s"], ["y"], min=-0.5, max=0.7)], [3, 4], None, opset=10),
    "clip from inputs, matmul, batchnorm 1-d, prelu (C,)": lambda: onnx_model(
        [N("Clip", ["x", "lo", "hi"], ["c"]), N("MatMul", ["c", "w"], ["m"]),
         N("BatchNormalization", ["m", "g", "b", "mu", "var"], ["bn"], epsilon=1e-3), N("PRelu", ["bn", "slope"], ["y"])],
        [2, 8], None, [("lo", np.array(-1.0, np.float32)), ("hi", np.array(0.8, np.float32)), ("w", rand(8, 5)),
                       ("g", rand(5, seed=1)), ("b", rand(5, seed=2)), ("mu", rand(5, seed=3)),
                       ("var", np.abs(rand(5, seed=4)) + 0.5), ("slope", rand(5, seed=5))]),
    "prelu slopes on the last axis (numpy broadcasting), one slope for all": lambda: onnx_model(
        [N("PRelu", ["x", "w_slope"], ["p"]), N("PRelu", ["p", "one"], ["y"])], [2, 3, 4, 5], None,
        [("w_slope", rand(5, seed=1)), ("one", np.array([0.3], np.float32))]),
    "batchnorm opset 8 spatial=0 (statistics per activation)": lambda: onnx_model(
        [N("BatchNormalization", ["x", "g", "b", "mu", "var"], ["y"], epsilon=1e-3, spatial=0)], [2, 3, 4, 5], None,
        [("g", rand(3, 4, 5, seed=1)), ("b", rand(3, 4, 5, seed=2)), ("mu", rand(3, 4, 5, seed=3)),
         ("var", np.abs(rand(3, 4, 5, seed=4)) + 0.5)], opset=8),
    "cast, identity, dropout with mask, mul, add": lambda: onnx_model(
        [N("Cast", ["x"], ["i"], to=TensorProto.INT64), N("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
         N("Identity", ["f"], ["d0"]), N("Dropout", ["d0"], ["d", "mask"], ratio=0.5), N("Mul", ["d", "x"], ["m"]),
         N("Add", ["m", "x"], ["y"])], [2, 3, 4], None, opset=11),
}


def mxnet_style_recognizer() -> onnx.ModelProto:
    """An older mxnet-converted recognizer's layout: opset 8, first nodes `_minusscalar0` / `_mulscalar0` (so
    insightface feeds raw 0..255 pixels), BN with `spatial`, PReLU slopes (C, 1, 1), Dropout, Flatten, Gemm."""
    nodes = [
        N("Sub", ["data", "mean"], ["centred"], name="_minusscalar0"),
        N("Mul", ["centred", "scale"], ["scaled"], name="_mulscalar0"),
        N("Conv", ["scaled", "w1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="conv0"),
        N("BatchNormalization", ["c1", "g", "b", "mu", "var"], ["bn"], epsilon=2e-5, spatial=1, name="bn0"),
        N("PRelu", ["bn", "slope"], ["act"], name="relu0"),
        N("Conv", ["act", "w2"], ["c2"], kernel_shape=[8, 8], strides=[8, 8], name="conv1"),
        N("Dropout", ["c2"], ["drop"], ratio=0.4, name="dropout0"),
        N("Flatten", ["drop"], ["flat"], name="flatten0"),
        N("Gemm", ["flat", "fc_w", "fc_b"], ["fc1"], transB=1, name="pre_fc1"),
    ]
    inits = [("mean", np.array([127.5], np.float32)), ("scale", np.array([0.0078125], np.float32)),
             ("w1", 0.3 * rand(8, 3, 3, 3)), ("g", 1 + 0.1 * rand(8, seed=1)), ("b", rand(8, seed=2)),
             ("mu", 0.1 * rand(8, seed=3)), ("var", np.abs(rand(8, seed=4)) + 0.5),
             ("slope", 0.25 * np.abs(rand(8, 1, 1, seed=5))), ("w2", 0.05 * rand(8, 8, 8, 8, seed=6)),
             ("fc_w", 0.05 * rand(16, 8 * 7 * 7, seed=7)), ("fc_b", rand(16, seed=8))]
    return onnx_model(nodes, [1, 3, 112, 112], [1, 16], inits, opset=8, input_name="data", output_name="fc1")
