"""Load InsightFace and Extract Face Features inside a real ComfyUI (COMFYUI_PATH; skipped without it): the
nodes run, feed Encode Identity, report progress, and a re-run with unchanged inputs is served from ComfyUI's
cache without doing any work."""
from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_fixtures import clip_vision_model, randomize_, tiny_adapter_config, write_adapter
from conftest import shared_assets_or_skip
from train.tiny_face_models import square_faces_image, write_model_pack

pytestmark = pytest.mark.comfyui

# A ComfyUI CLIP vision model with ViT-H/14's patch grid (224 px / 14 = 16 x 16 = 256 patches), tiny widths.
TINY_CLIP_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=224,
    projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5, model_type="clip_vision_model", num_channels=3,
)


def tiny_clip_vision(seed: int = 0):
    clip_vision = clip_vision_model(TINY_CLIP_VISION)
    randomize_(clip_vision.model, seed)
    return clip_vision


def as_comfy_image(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).float() / 255.0


@pytest.fixture(scope="module")
def host(comfy_pack, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("comfy_face")
    write_model_pack(root / "insightface", "tiny_pack", embed_dim=64)
    folder_paths.add_model_folder_path("insightface", str(root / "insightface"), is_default=True)
    (root / "idadapter").mkdir()
    folder_paths.add_model_folder_path("idadapter", str(root / "idadapter"), is_default=True)
    for folder in ("input", "temp", "output"):
        (root / folder).mkdir()
    folder_paths.set_input_directory(str(root / "input"))
    folder_paths.set_temp_directory(str(root / "temp"))
    folder_paths.set_output_directory(str(root / "output"))
    return dict(
        root=root,
        # the pack as ComfyUI imported it: its classes, not the test process's own `idadapter_core` copy
        face=importlib.import_module("comfyui_idadapter.idadapter_core.face"),
        errors=importlib.import_module("comfyui_idadapter.idadapter_core.errors"),
        nodes=importlib.import_module("comfyui_idadapter.nodes.face_nodes"),
        idadapter_nodes=importlib.import_module("comfyui_idadapter.nodes.idadapter_nodes"),
        clip_vision=tiny_clip_vision(),
    )


def load(host, name="tiny_pack", provider="CPU", det_size=256):
    return host["nodes"].LoadInsightFace.execute(name, provider, det_size).result[0]


def extract(host, analyzer, image, num_refs=4, fill_mode="replicate", face="largest", face_index=0, min_face_size=64,
            seed=0):
    return host["nodes"].ExtractFaceFeatures.execute(
        analyzer, host["clip_vision"], image, num_refs, fill_mode, face_index, min_face_size, seed, face=face
    ).result


def test_insightface_folder_is_registered(host):
    import folder_paths

    paths = folder_paths.get_folder_paths("insightface")
    assert str(host["root"] / "insightface") in paths
    assert any(p.endswith("models/insightface") or p.endswith("models\\insightface") for p in paths)
    # paths configured before the pack loads (extra_model_paths.yaml) are kept
    saved = folder_paths.folder_names_and_paths["insightface"]
    try:
        folder_paths.folder_names_and_paths["insightface"] = (["/from/extra_model_paths"], set())
        host["nodes"].register_insightface_folder()
        assert folder_paths.folder_names_and_paths["insightface"][0] == ["/from/extra_model_paths"]
    finally:
        folder_paths.folder_names_and_paths["insightface"] = saved


def test_schemas(host):
    from comfy_api.latest import io

    nodes = host["nodes"]
    assert [n.GET_SCHEMA().node_id for n in nodes.FACE_NODES] == ["IDAdapterLoadInsightFace", "IDAdapterExtractFaceFeatures"]
    for node in nodes.FACE_NODES:
        schema = node.GET_SCHEMA()
        assert schema.category == "IDAdapter" and schema.display_name
        assert all(i.tooltip for i in schema.inputs), f"{schema.node_id} has an input without a tooltip"
    loader = nodes.LoadInsightFace.GET_SCHEMA()
    assert loader.outputs[0].io_type == io.FaceAnalysis.io_type == "FACE_ANALYSIS"
    options = {i.id: i.options for i in loader.inputs if hasattr(i, "options")}
    assert options["model_name"][:2] == ["antelopev2", "buffalo_l"] and "tiny_pack" in options["model_name"]
    assert options["provider"][0] == "CPU"
    extract_schema = nodes.ExtractFaceFeatures.GET_SCHEMA()
    assert [o.io_type for o in extract_schema.outputs] == ["FACE_FEATURES", "IMAGE"]
    assert [i.io_type for i in extract_schema.inputs[:3]] == ["FACE_ANALYSIS", "CLIP_VISION", "IMAGE"]


def test_nodes_extract_features_and_preview(host):
    import comfy.utils

    analyzer = load(host)
    assert isinstance(analyzer, host["face"].FaceAnalyzer) and analyzer.embed_dim == 64
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append((value, total)))
    try:
        image = as_comfy_image(square_faces_image((256, 256), [(128, 128, 128)], seed=1),
                               np.full((256, 256, 3), 90, np.uint8))
        features, preview = extract(host, analyzer, image, num_refs=3, fill_mode="augment")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert isinstance(features, host["face"].FaceFeatures)
    assert features.face_embeds.shape == (3, 64)
    assert features.clip_patches.shape == (3, 256, 64)  # penultimate layer, CLS dropped
    assert features.clip_image_embeds.shape == (3, 32)
    assert features.source_indices == [0] and features.skipped.keys() == {1}
    assert preview.shape == (3, 224, 224, 3) and preview.dtype == torch.float32 and 0 <= preview.min() <= preview.max() <= 1
    assert progress[-1] == (2, 2)


def test_clip_features_are_comfyui_penultimate_states(host):
    analyzer = load(host)
    image = as_comfy_image(square_faces_image((256, 256), [(128, 128, 128)]))
    features, preview = extract(host, analyzer, image, num_refs=1)
    # the preview is the CLIP crop with marks drawn, so encode the crop itself: align again through the core
    faces, rgb, _ = host["face"].find_reference_faces(analyzer, image)
    crop = torch.from_numpy(host["face"].align_references(rgb, faces, 1)[0].clip_crop).float()[None] / 255.0
    out = host["clip_vision"].encode_image(crop, crop=False)
    torch.testing.assert_close(features.clip_patches, out.penultimate_hidden_states[:, 1:].float())
    torch.testing.assert_close(features.clip_image_embeds, out.image_embeds.float())


def test_output_feeds_encode_identity(host):
    config = tiny_adapter_config(face_dim=64, clip_dim=64, num_patches=256, clip_embed_dim=32)
    write_adapter(host["root"] / "idadapter" / "face-test.safetensors", config)
    adapter = host["idadapter_nodes"].LoadIDAdapter.execute("face-test.safetensors").result[0]
    image = as_comfy_image(square_faces_image((256, 256), [(128, 128, 128)]))
    features, _ = extract(host, load(host), image, num_refs=config.num_refs)
    embeds = host["idadapter_nodes"].EncodeIdentity.execute(adapter, features).result[0]
    assert embeds.reference_tokens.shape == (1, config.num_refs * 256 + 1, 64)
    assert torch.isfinite(embeds.reference_tokens).all()


def test_no_face_anywhere_is_one_clear_error(host):
    blank = as_comfy_image(np.full((256, 256, 3), 90, np.uint8), np.full((256, 256, 3), 200, np.uint8))
    with pytest.raises(host["face"].NoFaceError, match="image 1/2: no face found.*image 2/2: no face found.*detection size"):
        extract(host, load(host), blank)


def test_missing_model_pack_is_explained(host):
    with pytest.raises(host["face"].FaceModelMissingError, match="antelopev2.*glintr100.onnx.*never downloads"):
        load(host, "antelopev2")


def test_face_features_from_another_pack_type_are_refused(host):
    with pytest.raises(host["errors"].IDAdapterError, match="Load InsightFace"):
        extract(host, object(), as_comfy_image(np.zeros((64, 64, 3), np.uint8)))


def wide_and_tall_photos():
    """A landscape and a portrait photo, each with its face near one end: at 256 px detection both are found."""
    wide = square_faces_image((512, 256), [(416, 128, 128)], seed=1)
    tall = square_faces_image((256, 512), [(128, 416, 128)], seed=1)
    return as_comfy_image(wide), as_comfy_image(tall)


def test_photos_of_different_sizes_go_in_as_they_are(host):
    from comfy_extras.nodes_post_processing import batch_images

    analyzer = load(host)
    wide, tall = wide_and_tall_photos()
    features, preview = host["nodes"].ExtractFaceFeatures.execute(
        analyzer, host["clip_vision"], wide, 2, "replicate", -1, 64, 0, more_images={"image_2": tall}
    ).result
    assert features.source_indices == [0, 1] and not features.skipped and preview.shape[0] == 2
    # what Batch Images does to them: the portrait is cropped to the landscape's shape and its face is lost
    batched, _ = extract(host, analyzer, batch_images([wide, tall]), num_refs=2)
    assert batched.source_indices == [0] and "no face found" in batched.skipped[1]


def test_a_face_index_that_no_image_has_names_the_image_and_its_faces(host):
    image = as_comfy_image(square_faces_image((256, 256), [(128, 128, 128)]))
    with pytest.raises(host["face"].NoFaceError,
                       match=r"image: face_index 3 asked for .* holds only 1 face\(s\).*set face to 'largest'") as error:
        extract(host, load(host), image, face="left to right", face_index=3)
    assert "detection size" not in str(error.value)


def test_left_to_right_picks_one_person_of_a_group_photo(host):
    faces = [(64, 48, 32), (96, 224, 128), (256, 64, 64)]  # (centre x, centre y, side): the middle one is largest
    image = as_comfy_image(square_faces_image((320, 320), faces))
    analyzer = load(host, det_size=320)
    picked = [extract(host, analyzer, image, num_refs=1, min_face_size=0)[0]]
    picked += [extract(host, analyzer, image, num_refs=1, face="left to right", face_index=i, min_face_size=0)[0]
               for i in range(3)]
    assert [float((f.boxes[0, 0] + f.boxes[0, 2]) / 2) for f in picked] == [96, 64, 96, 256]


def test_a_pack_unzipped_without_the_models_level_is_offered(host, tmp_path, caplog):
    import folder_paths

    write_model_pack(tmp_path / "unzipped", "flat_pack", embed_dim=64)
    (tmp_path / "unzipped" / "models" / "flat_pack").rename(tmp_path / "flat_pack")
    folder_paths.add_model_folder_path("insightface", str(tmp_path))
    assert "flat_pack" in host["nodes"].insightface_model_names()
    with caplog.at_level(logging.WARNING):
        assert load(host, "flat_pack").embed_dim == 64
    assert "move the folder into 'models'" in caplog.text


def test_face_similarity_takes_another_packs_insightface_and_refuses_anything_else(host):
    from insightface.app import FaceAnalysis

    evaluation = importlib.import_module("comfyui_idadapter.nodes.evaluation_nodes")
    image = as_comfy_image(square_faces_image((256, 256), [(128, 128, 128)]))
    with pytest.raises(host["errors"].IDAdapterError, match="Load InsightFace"):
        evaluation.FaceSimilarity.execute(object(), image, image)
    theirs = FaceAnalysis(name=str(host["root"] / "insightface" / "models" / "tiny_pack"),
                          allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"])
    theirs.prepare(ctx_id=0, det_size=(256, 256))
    scores, summary = evaluation.FaceSimilarity.execute(theirs, image, image).result
    assert scores == [pytest.approx(1.0, abs=1e-5)]


def test_references_of_different_people_are_named_in_a_warning(host, tmp_path, caplog):
    import folder_paths

    assets = shared_assets_or_skip()
    shutil.copytree(assets / "insightface" / "models" / "standin_scrfd_mbf128", tmp_path / "models" / "standin_scrfd_mbf128")
    folder_paths.add_model_folder_path("insightface", str(tmp_path))
    analyzer = load(host, "standin_scrfd_mbf128", det_size=640)
    photos = {name: as_comfy_image(np.asarray(Image.open(assets / "faces" / name).convert("RGB")))
              for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")}
    node = host["nodes"].ExtractFaceFeatures
    with caplog.at_level(logging.WARNING):
        one_person = node.execute(analyzer, host["clip_vision"], photos["obama.jpg"], 3, "replicate", -1, 64, 0,
                                  more_images={"image_2": photos["obama2.jpg"], "image_3": photos["obama3.jpg"]})
    assert one_person.result[0].source_indices == [0, 1, 2] and not one_person.result[0].other_people
    assert "one person" not in caplog.text
    with caplog.at_level(logging.WARNING):
        mixed = node.execute(analyzer, host["clip_vision"], photos["obama.jpg"], 3, "replicate", -1, 64, 0,
                             more_images={"image_2": photos["obama2.jpg"], "image_3": photos["biden.jpg"]})
    features = mixed.result[0]
    assert list(features.other_people) == [2] and features.other_people[2] < 0.1
    assert f"do not look like one person: image_3 (similarity {features.other_people[2]:.2f})" in caplog.text


# --- inside ComfyUI's executor --------------------------------------------------------------------------


class RecordingServer:
    """What PromptExecutor needs of the server: it records the messages the UI would get."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))


class TinyClipVisionLoader:
    """Stands in for Load CLIP Vision (whose files are hundreds of MB) in the executor test."""

    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (tiny_clip_vision(),)


@pytest.fixture
def executor(host, monkeypatch):
    import execution
    import nodes

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "IDAdapterLoadInsightFace", host["nodes"].LoadInsightFace)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "IDAdapterExtractFaceFeatures", host["nodes"].ExtractFaceFeatures)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestTinyClipVisionLoader", TinyClipVisionLoader)
    Image.fromarray(square_faces_image((256, 256), [(128, 128, 128)])).save(host["root"] / "input" / "face.png")
    server = RecordingServer()
    prompt_executor = execution.PromptExecutor(
        server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0}
    )

    def run(prompt: dict, prompt_id: str) -> dict:
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        assert valid, (error, node_errors)
        server.messages.clear()
        prompt_executor.execute(prompt, prompt_id, {"client_id": "test"}, outputs)
        assert prompt_executor.success, [m for m in server.messages if m[0] == "execution_error"]
        events = dict(server.messages)
        executed = [d["node"] for e, d in server.messages if e == "executing" and d.get("node")]

        def outputs(node_id: str) -> list:
            cached = prompt_executor.caches.outputs.get(node_id)  # a coroutine from ComfyUI v0.18.0 on
            return (asyncio.run(cached) if inspect.isawaitable(cached) else cached).outputs

        return dict(cached=set(events["execution_cached"]["nodes"]), executed=executed, outputs=outputs)

    return run


def face_prompt(provider="CPU", seed=0) -> dict:
    return {
        "1": {"class_type": "IDAdapterLoadInsightFace", "inputs": {"model_name": "tiny_pack", "provider": provider, "det_size": 256}},
        "2": {"class_type": "TestTinyClipVisionLoader", "inputs": {}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "4": {"class_type": "IDAdapterExtractFaceFeatures", "inputs": {
            "face_analysis": ["1", 0], "clip_vision": ["2", 0], "image": ["3", 0], "num_refs": 4,
            "fill_mode": "augment", "face": "largest", "face_index": 0, "min_face_size": 64, "seed": seed}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }


def test_rerun_with_unchanged_inputs_does_no_work(executor, caplog):
    # a provider this machine lacks passes validation (workflows move between machines) and runs on CPU
    with caplog.at_level(logging.WARNING):
        first = executor(face_prompt(provider="CUDA"), "first")
    assert "provider 'CUDA' is not installed" in caplog.text
    assert {"1", "2", "3", "4", "5"} <= set(first["executed"])
    again = executor(face_prompt(provider="CUDA"), "again")
    assert again["cached"] == {"1", "2", "3", "4", "5"} and again["executed"] == []
    reseeded = executor(face_prompt(provider="CUDA", seed=1), "reseeded")
    assert set(reseeded["executed"]) == {"4", "5"} and {"1", "2", "3"} <= reseeded["cached"]


def test_photos_of_different_sizes_through_comfyuis_executor(executor, host):
    wide, tall = wide_and_tall_photos()
    for name, photo in (("wide.png", wide), ("tall.png", tall)):
        Image.fromarray((photo[0].numpy() * 255).round().astype(np.uint8)).save(host["root"] / "input" / name)
    prompt = face_prompt()
    prompt["3"]["inputs"]["image"] = "wide.png"
    prompt["6"] = {"class_type": "LoadImage", "inputs": {"image": "tall.png"}}
    prompt["4"]["inputs"]["more_images.image_2"] = ["6", 0]
    result = executor(prompt, "two-sizes")
    features = result["outputs"]("4")[0][0]
    assert features.source_indices == [0, 1] and not features.skipped


def test_real_standin_pack_through_the_nodes(host, tmp_path):
    """The production path: the stand-in pack and a real photo, inside ComfyUI."""
    import folder_paths

    assets = shared_assets_or_skip()
    shutil.copytree(assets / "insightface" / "models" / "standin_scrfd_mbf128", tmp_path / "models" / "standin_scrfd_mbf128")
    folder_paths.add_model_folder_path("insightface", str(tmp_path))
    analyzer = load(host, "standin_scrfd_mbf128", det_size=640)
    photo = np.asarray(Image.open(assets / "faces" / "obama.jpg").convert("RGB"))
    features, preview = extract(host, analyzer, as_comfy_image(photo), num_refs=2)
    assert features.face_model == "standin_scrfd_mbf128" and features.face_embeds.shape == (2, 128)
    assert features.boxes.shape == (1, 4) and preview.shape == (2, 224, 224, 3)
