"""The shipped workflows are well-formed, each graph is held once (the API twin is its UI workflow converted) and
no node covers another on the canvas. The host test checks them against the live node definitions."""
import json

import pytest

from conftest import REPO_ROOT
from workflow_format import (
    api_from_ui, min_body_height, overlapping_nodes, strip_meta, widget_slots_from_api_node,
)

UI_DIR = REPO_ROOT / "example_workflows"
"""The folder ComfyUI's templates browser lists for a custom node pack (app/custom_node_manager.py)."""
API_DIR = REPO_ROOT / "workflows" / "api"
WORKFLOWS = sorted(p.stem for p in UI_DIR.glob("*.json"))


def load_ui(name: str) -> dict:
    return json.loads((UI_DIR / f"{name}.json").read_text())


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def test_every_ui_workflow_has_an_api_twin_and_a_thumbnail():
    assert {"idadapter_sd15", "idadapter_sdxl", "inv_adapter_sd15"} <= set(WORKFLOWS)
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == WORKFLOWS
    for name in WORKFLOWS:
        assert (UI_DIR / f"{name}.jpg").read_bytes()[:2] == b"\xff\xd8"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_links_are_consistent(name):
    ui = load_ui(name)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(link[0] for link in ui["links"])
    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        output = nodes[source]["outputs"][source_slot]
        slot = nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and slot["link"] == link_id
        assert output["type"] == link_type and slot["type"] in (link_type, "*")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflow_is_the_ui_workflow_converted(name):
    """Widget names come from the API twin here (the host test takes them from ComfyUI's node definitions), so this
    checks every node, link and widget value, and where the frontend's extra widgets sit in `widgets_values`."""
    api = load_api(name)

    def slots(node: dict) -> list[str | None]:
        return widget_slots_from_api_node(node["type"], api[str(node["id"])]["inputs"])

    assert api_from_ui(load_ui(name), slots) == strip_meta(api)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_no_node_covers_another(name):
    ui = load_ui(name)
    for node in ui["nodes"]:
        assert node["size"][1] >= min_body_height(node), (node["id"], node["type"], node["size"], min_body_height(node))
    assert overlapping_nodes(ui) == []


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflows_use_only_this_pack_and_core_nodes(name):
    core = {"CheckpointLoaderSimple", "LoadImage", "CLIPVisionLoader", "CLIPTextEncode", "EmptyLatentImage",
            "KSampler", "VAEDecode", "SaveImage", "PreviewImage", "PreviewAny",
            "SolidMask", "MaskComposite", "InvertMask", "ConditioningSetMask", "ConditioningCombine"}
    api = load_api(name)
    assert {n["class_type"] for n in api.values()} - core <= {
        "IDAdapterLoadInsightFace", "IDAdapterExtractFaceFeatures", "IDAdapterLoader", "IDAdapterEncodeIdentity",
        "IDAdapterApply", "IDAdapterIdentityPrompt", "IDAdapterFaceSimilarity",
        "InvAdapterLoader", "InvAdapterInvertReference", "InvAdapterApply",
    }


@pytest.mark.parametrize("name", ["idadapter_sd15", "idadapter_sdxl"])
def test_model_loaders_tell_the_frontend_what_to_fetch_and_several_photos_go_in_at_their_size(name):
    ui = load_ui(name)
    loaders = {n["type"]: n for n in ui["nodes"] if n["type"] in ("CheckpointLoaderSimple", "CLIPVisionLoader")}
    for node_type, directory in (("CheckpointLoaderSimple", "checkpoints"), ("CLIPVisionLoader", "clip_vision")):
        (model,) = loaders[node_type]["properties"]["models"]
        assert model["name"] == loaders[node_type]["widgets_values"][0] and model["directory"] == directory
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(".safetensors")
    api = load_api(name)
    extract = next(node for node in api.values() if node["class_type"] == "IDAdapterExtractFaceFeatures")
    assert api[extract["inputs"]["more_images.image_2"][0]]["class_type"] == "LoadImage"


def test_inv_adapter_workflow_names_its_checkpoint_for_the_frontend():
    ui = load_ui("inv_adapter_sd15")
    (loader,) = [n for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    (model,) = loader["properties"]["models"]
    assert model == {"name": loader["widgets_values"][0], "directory": "checkpoints",
                     "url": f"https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/{model['name']}"}
