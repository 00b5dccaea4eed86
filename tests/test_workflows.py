"""The shipped workflows are well-formed (the host test checks them against the live node definitions)."""
import json

import pytest

from conftest import REPO_ROOT

WORKFLOWS = sorted(p.stem for p in (REPO_ROOT / "workflows").glob("*.json"))


def test_every_ui_workflow_has_an_api_twin_and_a_thumbnail():
    assert WORKFLOWS == ["idadapter_sd15", "idadapter_sdxl", "inv_adapter_sd15"]
    for name in WORKFLOWS:
        assert (REPO_ROOT / "workflows" / f"{name}.jpg").read_bytes()[:2] == b"\xff\xd8"
        assert (REPO_ROOT / "workflows" / "api" / f"{name}.json").is_file()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_links_are_consistent_and_match_the_api_graph(name):
    ui = json.loads((REPO_ROOT / "workflows" / f"{name}.json").read_text())
    api = json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert {str(i): n["type"] for i, n in nodes.items()} == {k: v["class_type"] for k, v in api.items()}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == len(ui["links"])
    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        output = nodes[source]["outputs"][source_slot]
        slot = nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and slot["link"] == link_id
        assert output["type"] == link_type and slot["type"] in (link_type, "*")
        # the same edge in the API graph
        assert api[str(target)]["inputs"][slot["name"]] == [str(source), source_slot]
    linked_in_api = sum(isinstance(v, list) for node in api.values() for v in node["inputs"].values())
    assert linked_in_api == len(ui["links"])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflows_use_only_this_pack_and_core_nodes(name):
    core = {"CheckpointLoaderSimple", "LoadImage", "CLIPVisionLoader", "CLIPTextEncode", "EmptyLatentImage",
            "KSampler", "VAEDecode", "SaveImage", "PreviewImage", "PreviewAny"}
    api = json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text())
    assert {n["class_type"] for n in api.values()} - core <= {
        "IDAdapterLoadInsightFace", "IDAdapterExtractFaceFeatures", "IDAdapterLoader", "IDAdapterEncodeIdentity",
        "IDAdapterApply", "IDAdapterIdentityPrompt", "IDAdapterFaceSimilarity",
        "InvAdapterLoader", "InvAdapterInvertReference", "InvAdapterApply",
    }


@pytest.mark.parametrize("name", ["idadapter_sd15", "idadapter_sdxl"])
def test_model_loaders_tell_the_frontend_what_to_fetch_and_several_photos_go_in_at_their_size(name):
    ui = json.loads((REPO_ROOT / "workflows" / f"{name}.json").read_text())
    loaders = {n["type"]: n for n in ui["nodes"] if n["type"] in ("CheckpointLoaderSimple", "CLIPVisionLoader")}
    for node_type, directory in (("CheckpointLoaderSimple", "checkpoints"), ("CLIPVisionLoader", "clip_vision")):
        (model,) = loaders[node_type]["properties"]["models"]
        assert model["name"] == loaders[node_type]["widgets_values"][0] and model["directory"] == directory
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(".safetensors")
    api = json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text())
    extract = next(node for node in api.values() if node["class_type"] == "IDAdapterExtractFaceFeatures")
    assert api[extract["inputs"]["more_images.image_2"][0]]["class_type"] == "LoadImage"


def test_inv_adapter_workflow_names_its_checkpoint_for_the_frontend():
    ui = json.loads((REPO_ROOT / "workflows" / "inv_adapter_sd15.json").read_text())
    (loader,) = [n for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    (model,) = loader["properties"]["models"]
    assert model == {"name": loader["widgets_values"][0], "directory": "checkpoints",
                     "url": f"https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/{model['name']}"}
