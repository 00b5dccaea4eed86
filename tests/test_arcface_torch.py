"""ArcFace as a differentiable torch module (train/arcface_torch.py on train/onnx_to_torch.py) against
onnxruntime and insightface's own `ArcFaceONNX.get_feat`: the real stand-in recognizer on real photos,
random-weight IResNet-50/100 and MobileFaceNet exported like insightface's files, the tiny test recognizer,
single-op graphs, gradients, and the errors.

Tolerance: float32 runs of the same graph by two engines differ by accumulation order only, so the embeddings
must agree to 1e-4 of the embedding's largest magnitude (max abs deviation) and to cosine >= 1 - 1e-6.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import shared_assets_or_skip
from train.tiny_face_models import write_model_pack
from idadapter_core.errors import IDAdapterError
from train.insightface_archs import (
    IRESNET50_STAGES, IRESNET100_STAGES, IResNet, MobileFaceNet, as_input, export_like_insightface, get_feat_rgb,
    random_crops, randomize, real_crops,
)
from train.arcface_torch import ArcFaceTorch, insightface_input_normalisation
from train.onnx_reference_graphs import SINGLE_OP_GRAPHS, mxnet_style_recognizer, onnx_model, rand
from train.onnx_to_torch import OnnxConversionError, UnsupportedOnnxOpError, convert_onnx

RELATIVE_TOLERANCE = 1e-4
COSINE_TOLERANCE = 1e-6
STANDIN = "standin_scrfd_mbf128"


def insightface_recognizer(path):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    return ArcFaceONNX(model_file=str(path))


def assert_same_embeddings(ours: torch.Tensor, reference: np.ndarray) -> None:
    ours = ours.detach().double().numpy()
    reference = reference.astype(np.float64)
    assert ours.shape == reference.shape
    deviation = float(np.abs(ours - reference).max())
    cosine = float(np.min(np.sum(ours * reference, 1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)))
    assert deviation <= RELATIVE_TOLERANCE * np.abs(reference).max(), (deviation, np.abs(reference).max())
    assert cosine >= 1 - COSINE_TOLERANCE


# ------------------------------------------------------------------------------------------------ real recognizer

def test_standin_recognizer_matches_insightface_on_real_photos():
    from idadapter_core.face import load_face_analyzer

    assets = shared_assets_or_skip()
    analyzer = load_face_analyzer(assets / "insightface", STANDIN, "CPU", det_size=640)
    crops = real_crops(assets, STANDIN)

    recognizer = analyzer.recognizer
    arcface = ArcFaceTorch.from_onnx(recognizer.model_file)
    assert (arcface.input_mean, arcface.input_std) == (recognizer.input_mean, recognizer.input_std) == (127.5, 127.5)
    assert arcface.input_size == tuple(recognizer.input_size) == (112, 112)
    assert arcface.embed_dim == analyzer.embed_dim == 128
    with torch.no_grad():
        ours = arcface(as_input(crops))
    assert_same_embeddings(ours, get_feat_rgb(recognizer, crops))
    # and what the pipeline compares: Obama is closer to Obama than to Biden with our embeddings too
    unit = torch.nn.functional.normalize(ours, dim=1)
    similarity = unit @ unit.T
    assert similarity[0, 1] > similarity[0, 3] + 0.3 and similarity[0, 2] > similarity[0, 3] + 0.3


# ------------------------------------------------------------------------------------- insightface architectures

ARCHITECTURES = {
    "mobilefacenet": lambda: MobileFaceNet(),
    "iresnet50-narrow": lambda: IResNet(IRESNET50_STAGES, widths=(16, 32, 64, 128)),
    "iresnet50": lambda: IResNet(IRESNET50_STAGES),
    "iresnet100": lambda: IResNet(IRESNET100_STAGES),
}
SLOW = {"iresnet50", "iresnet100"}  # 5-10 s and 6-25 s on two shared CPU cores, 170 MB and 260 MB files


@pytest.fixture(scope="module")
def mobilefacenet(tmp_path_factory) -> tuple[MobileFaceNet, Path]:
    """A random-weight MobileFaceNet and its insightface-style ONNX file."""
    model = randomize(MobileFaceNet(), seed=1)
    return model, export_like_insightface(model, tmp_path_factory.mktemp("mbf") / "mbf.onnx")


@pytest.fixture(scope="module")
def mobilefacenet_file(mobilefacenet):
    return mobilefacenet[1]


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in ARCHITECTURES]
)
def test_insightface_architectures_match_insightface(arch, tmp_path):
    path = export_like_insightface(randomize(ARCHITECTURES[arch](), seed=0), tmp_path / f"{arch}.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    # BN2d that is not folded into a conv, BN1d on the embedding, per-channel PReLU, residual adds
    assert {"BatchNormalization", "PRelu", "Add", "Conv"} <= ops
    arcface = ArcFaceTorch.from_onnx(path)
    assert arcface.embed_dim == 512 and arcface.input_size == (112, 112)
    crops = random_crops(3)
    with torch.no_grad():
        ours = arcface(as_input(crops))
    assert_same_embeddings(ours, get_feat_rgb(insightface_recognizer(path), crops))


def test_tiny_test_recognizer_matches_insightface(tmp_path):
    folder = write_model_pack(tmp_path, detector=False, embed_dim=64)
    arcface = ArcFaceTorch.from_onnx(folder / "rec_tiny.onnx")
    assert arcface.embed_dim == 64
    crops = random_crops(2, seed=3)
    with torch.no_grad():
        ours = arcface(as_input(crops))
    assert_same_embeddings(ours, get_feat_rgb(insightface_recognizer(folder / "rec_tiny.onnx"), crops))


# ------------------------------------------------------------------------------------------------------ gradients

def test_gradients_reach_the_input_and_equal_torchs_own(mobilefacenet):
    """The face-ID loss' form, 1 - cos (DESIGN.md §2.5), backpropagated to the pixels through the converted graph
    and through the torch model it was exported from (float64 both; the export folds conv+BN in float32, so the
    two differ by that rounding only)."""
    model, path = mobilefacenet
    native = copy.deepcopy(model).double()
    arcface = ArcFaceTorch.from_onnx(path).double()
    assert sum(p.numel() for p in arcface.parameters() if p.requires_grad) == 0
    g = torch.Generator().manual_seed(0)
    image = 0.2 + 0.6 * torch.rand(2, 3, 112, 112, generator=g, dtype=torch.float64)
    target = torch.randn(2, 512, generator=g, dtype=torch.float64)

    def input_gradient(embed) -> torch.Tensor:
        x = image.clone().requires_grad_(True)
        (1 - torch.nn.functional.cosine_similarity(embed(x), target)).sum().backward()
        return x.grad

    ours = input_gradient(arcface)
    reference = input_gradient(lambda x: native(x * 2 - 1))  # insightface's (255 x - 127.5) / 127.5
    assert torch.isfinite(ours).all() and (ours != 0).double().mean() > 0.99
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


# ------------------------------------------------------------------------------------------------- single ops

def assert_matches_onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> float:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ours = convert_onnx(model)(torch.from_numpy(x)).numpy()
    assert ours.shape == reference.shape
    deviation = float(np.abs(ours - reference).max())
    assert deviation <= 1e-5 * max(1.0, float(np.abs(reference).max()))
    return deviation


N = helper.make_node


@pytest.mark.parametrize("case", list(SINGLE_OP_GRAPHS))
def test_single_op_graphs_match_onnxruntime(case):
    model = SINGLE_OP_GRAPHS[case]()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert_matches_onnxruntime(model, 3 * rand(*shape, seed=9))


def test_mxnet_style_recognizer_takes_raw_pixels_like_insightface(tmp_path):
    path = tmp_path / "mxnet_style.onnx"
    onnx.save(mxnet_style_recognizer(), str(path))
    recognizer = insightface_recognizer(path)
    arcface = ArcFaceTorch.from_onnx(path)
    assert insightface_input_normalisation(onnx.load(str(path))) == (0.0, 1.0)
    assert (arcface.input_mean, arcface.input_std) == (recognizer.input_mean, recognizer.input_std) == (0.0, 1.0)
    crops = random_crops(2, seed=5)
    with torch.no_grad():
        ours = arcface(as_input(crops))
    assert_same_embeddings(ours, get_feat_rgb(recognizer, crops))


# --------------------------------------------------------------------------------------------------------- errors

def test_unsupported_op_names_the_op_and_the_node():
    model = onnx_model([N("Relu", ["x"], ["r"]), N("Einsum", ["r", "r"], ["y"], equation="ij,ij->ij", name="mix_them")],
                       [2, 3], None, opset=17)
    with pytest.raises(UnsupportedOnnxOpError, match=r"node #1 'mix_them' \(Einsum\).*'Einsum' is not supported"):
        convert_onnx(model)


def test_fused_onnxruntime_op_is_refused_with_its_domain():
    node = N("FusedConv", ["x", "w"], ["y"], domain="com.microsoft", name="fused_0", activation="Relu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(rand(2, 2, 1, 1), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedOnnxOpError, match="'fused_0'.*FusedConv.*com.microsoft"):
        convert_onnx(model)


def test_unreadable_files_and_wrong_inputs_are_explained(tmp_path, mobilefacenet_file):
    truncated = tmp_path / "glintr100.onnx"
    truncated.write_bytes(mobilefacenet_file.read_bytes()[:5000])
    with pytest.raises(OnnxConversionError, match="truncated"):
        ArcFaceTorch.from_onnx(truncated)
    with pytest.raises(OnnxConversionError, match="no ONNX file"):
        ArcFaceTorch.from_onnx(tmp_path / "missing.onnx")
    arcface = ArcFaceTorch.from_onnx(mobilefacenet_file)
    with pytest.raises(IDAdapterError, match=r"\(B, 3, 112, 112\)"):
        arcface(torch.rand(1, 3, 128, 128))
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 112])
    two_outputs = helper.make_model(helper.make_graph(
        [N("Relu", ["x"], ["a"]), N("Sigmoid", ["x"], ["b"])], "detector-like", [image],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 112, 112]) for name in "ab"]))
    with pytest.raises(OnnxConversionError, match="one input and one output"):
        ArcFaceTorch.from_onnx(two_outputs)
    dynamic = onnx_model([N("Relu", ["x"], ["y"])], [1, 3, "height", "width"], None)
    with pytest.raises(OnnxConversionError, match=r"static \(1, 3, H, W\)"):
        ArcFaceTorch.from_onnx(dynamic)
