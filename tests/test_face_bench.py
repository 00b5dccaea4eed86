"""bench/face_encode.py builds what it says: SCRFD-10G and ArcFace R100 layouts of the published size
(train/insightface_archs.py), routed by insightface as a keypoint detector and a 512-d recognizer."""
import pytest
import torch

from bench import face_encode as bench
from idadapter_core.face import to_rgb_uint8
from train.insightface_archs import IRESNET100_STAGES, SCRFD10G, IResNet


def test_model_layouts_have_the_published_cost():
    """SCRFD-10G: 10 GMACs at VGA (the name's "10G"); IResNet-100: 12.1 GMACs (insightface's 24.2 GFLOPs)."""
    with torch.device("meta"):
        detector, recognizer = SCRFD10G().eval(), IResNet(IRESNET100_STAGES).eval()
        assert 9.9 < bench.gmacs(detector, torch.zeros(1, 3, 480, 640)) < 10.1
        assert 12.0 < bench.gmacs(recognizer, torch.zeros(1, 3, 112, 112)) < 12.2
        outputs = detector(torch.zeros(1, 3, 640, 640))
    rows = [(640 // s) ** 2 * 2 for s in SCRFD10G.strides]
    assert [tuple(o.shape) for o in outputs] == [(n, w) for w in (1, 4, 10) for n in rows]


@pytest.mark.slow
def test_exported_pack_is_routed_by_insightface(tmp_path):
    from insightface.model_zoo.scrfd import SCRFD

    from idadapter_core.face import load_face_analyzer

    bench.export_pack(tmp_path / "models" / "bench")
    analyzer = load_face_analyzer(tmp_path, "bench", det_size=640)
    assert isinstance(analyzer.detector, SCRFD) and analyzer.detector.use_kps
    assert analyzer.embed_dim == 512
    image = to_rgb_uint8(torch.rand(480, 640, 3))
    assert len(analyzer.detect(image, 640)[0]) == 0  # score heads biased off: nothing for NMS to do
