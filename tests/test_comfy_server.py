"""The pack inside a running ComfyUI server: it loads, every node is listed, the shipped workflows validate,
the SD1.5 graph runs end to end on random-weight models, and bad inputs fail one prompt, not the server.
Needs COMFYUI_PATH and the real face assets in ../shared (skipped otherwise)."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from comfy_fixtures import (
    comfy_clip_vision_config, tiny_adapter_config, write_adapter, write_clip_vision, write_inv_adapter,
    write_tiny_sd15_checkpoint,
)
from conftest import REPO_ROOT, comfyui_path_or_skip, shared_assets_or_skip
from idadapter_core.presets import UNetLayout
from workflow_format import (
    CONTROL_MODES, api_from_ui, strip_meta, widget_slots_from_api_node, widget_slots_from_definition,
)

pytestmark = pytest.mark.comfyui

PACK_NODES = {
    "IDAdapterLoadInsightFace", "IDAdapterExtractFaceFeatures", "IDAdapterLoader", "IDAdapterEncodeIdentity",
    "IDAdapterApply", "IDAdapterIdentityPrompt", "IDAdapterSaveIDEmbeds", "IDAdapterLoadIDEmbeds",
    "IDAdapterFaceSimilarity", "InvAdapterLoader", "InvAdapterInvertReference", "InvAdapterApply",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(comfy_pack, tmp_path_factory):
    assets = shared_assets_or_skip()
    comfy_root = comfyui_path_or_skip()
    base = tmp_path_factory.mktemp("comfy_base")
    models = base / "models"
    for folder in ("checkpoints", "clip_vision", "idadapter", "inv_adapter", "insightface/models"):
        (models / folder).mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-IDAdapter").symlink_to(REPO_ROOT, target_is_directory=True)
    (models / "insightface/models/standin_scrfd_mbf128").symlink_to(assets / "insightface/models/standin_scrfd_mbf128")
    (base / "input").mkdir()
    shutil.copy(assets / "faces/obama.jpg", base / "input/face.jpg")
    for photo in ("obama.jpg", "biden.jpg"):  # the two-person workflow's photos, under its own names
        shutil.copy(assets / "faces" / photo, base / "input" / photo)
    from PIL import Image

    Image.new("RGB", (256, 256), (120, 120, 120)).save(base / "input/noface.png")
    write_tiny_sd15_checkpoint(models / "checkpoints/tiny-sd15.safetensors")
    write_clip_vision(models / "clip_vision/vitl.safetensors", comfy_clip_vision_config("vitl"))
    write_adapter(models / "idadapter/tiny.safetensors", tiny_adapter_config(), kv_scale=0.02)
    write_adapter(models / "idadapter/wrong-base.safetensors",
                  tiny_adapter_config(UNetLayout("custom", (320, 640), (8, 8), 768, {"l": 768})))
    write_inv_adapter(models / "inv_adapter/tiny.safetensors")
    write_inv_adapter(models / "inv_adapter/wrong-base.safetensors", UNetLayout("custom", (320, 640), (8, 8), 768))
    data = (models / "idadapter/tiny.safetensors").read_bytes()
    (models / "idadapter/corrupt.safetensors").write_bytes(data[: len(data) // 2])

    port = free_port()
    log_path = base / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)],
            cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited early:\n{log_path.read_text()[-3000:]}")
            try:
                get(url, "/object_info/KSampler")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        else:
            pytest.fail(f"ComfyUI did not start:\n{log_path.read_text()[-3000:]}")
        yield dict(url=url, base=base, log=log_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=30) as response:
        return json.loads(response.read())


def run_prompt(server, prompt: dict, timeout: float = 600) -> dict:
    body = json.dumps({"prompt": prompt, "client_id": "idadapter-tests"}).encode()
    request = urllib.request.Request(server["url"] + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            prompt_id = json.loads(response.read())["prompt_id"]
    except urllib.error.HTTPError as err:
        return {"rejected": json.loads(err.read())}
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = get(server["url"], f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            if history[prompt_id]["status"]["status_str"] in ("success", "error"):
                return history[prompt_id]
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")


def error_message(result: dict) -> str:
    for kind, data in result["status"]["messages"]:
        if kind == "execution_error":
            return data["exception_message"]
    return ""


def workflow_prompt(name: str, values: dict, overrides: dict) -> dict:
    """A shipped API workflow with its inputs set per node type: `values` (the test's tiny models), then `overrides`."""
    prompt = json.loads((REPO_ROOT / f"workflows/api/{name}.json").read_text())
    values = {node_type: dict(changes) for node_type, changes in values.items()}
    for node_type, changes in overrides.items():
        values.setdefault(node_type, {}).update(changes)
    for node in prompt.values():
        node["inputs"].update(values.get(node["class_type"], {}))
    return prompt


TINY_MODELS = {
    "CheckpointLoaderSimple": {"ckpt_name": "tiny-sd15.safetensors"},
    "LoadImage": {"image": "face.jpg"},
    "IDAdapterLoadInsightFace": {"model_name": "standin_scrfd_mbf128"},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
}


def sd15_prompt(**overrides) -> dict:
    """The shipped SD1.5 API workflow, pointed at the test's tiny models."""
    values = dict(TINY_MODELS, CLIPVisionLoader={"clip_name": "vitl.safetensors"},
                  IDAdapterExtractFaceFeatures={"num_refs": 2}, IDAdapterLoader={"adapter_name": "tiny.safetensors"})
    return workflow_prompt("idadapter_sd15", values, overrides)


def two_people_prompt(**overrides) -> dict:
    """The shipped two-person workflow (its own two photos) on the tiny models, a landscape latent like its own."""
    values = {key: value for key, value in TINY_MODELS.items() if key != "LoadImage"}
    values.update(CLIPVisionLoader={"clip_name": "vitl.safetensors"}, IDAdapterExtractFaceFeatures={"num_refs": 2},
                  IDAdapterLoader={"adapter_name": "tiny.safetensors"}, EmptyLatentImage={"width": 96, "height": 64})
    return workflow_prompt("idadapter_two_people_sd15", values, overrides)


def inv_adapter_prompt(**overrides) -> dict:
    """The shipped Inv-Adapter SD1.5 API workflow, pointed at the test's tiny models."""
    values = dict(TINY_MODELS, InvAdapterInvertReference={"steps": 3, "crop_size": 64},
                  InvAdapterLoader={"adapter_name": "tiny.safetensors"})
    return workflow_prompt("inv_adapter_sd15", values, overrides)


def apply_prompt(method: str, apply_inputs: dict) -> dict:
    """The shipped SD1.5 workflow of `method` ("idadapter" or "inv_adapter") with these inputs on its Apply node."""
    if method == "idadapter":
        return sd15_prompt(IDAdapterApply=apply_inputs)
    return inv_adapter_prompt(InvAdapterApply=apply_inputs)


def test_pack_loads_and_lists_every_node(server):
    log = server["log"].read_text()
    # this pack's line only: some of ComfyUI's own optional nodes fail to import on some machines (nodes_glsl.py
    # without OpenGL before v0.27.0)
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "ComfyUI-IDAdapter" in line], log[-3000:]
    assert "ComfyUI-IDAdapter" in log, log[-3000:]  # the line the check above reads is there
    info = get(server["url"], "/object_info")
    assert PACK_NODES <= info.keys()
    for node_id in PACK_NODES:
        assert info[node_id]["category"] == "IDAdapter"
        for section in info[node_id]["input"].values():
            for name, spec in section.items():
                if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict):
                    assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def input_names(definition: dict) -> set[str]:
    """Every input a node definition accepts, an autogrow input's slots included (`more_images.image_2`, ...)."""
    names = set()
    for section in definition["input"].values():
        for name, spec in section.items():
            names.add(name)
            if spec[0] == "COMFY_AUTOGROW_V3":
                template = spec[1]["template"]
                slots = template.get("names") or [f"{template['prefix']}{i}" for i in range(template["max"])]
                names.update(f"{name}.{slot}" for slot in slots)
    return names


UI_WORKFLOWS = sorted(p.stem for p in (REPO_ROOT / "example_workflows").glob("*.json"))


def load_ui_workflow(name: str) -> dict:
    return json.loads((REPO_ROOT / f"example_workflows/{name}.json").read_text())


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_shipped_workflows_match_the_node_definitions(server, name):
    info = get(server["url"], "/object_info")
    api = json.loads((REPO_ROOT / f"workflows/api/{name}.json").read_text())
    for node_id, node in api.items():
        definition = info[node["class_type"]]
        known = input_names(definition)
        assert set(node["inputs"]) <= known, (node_id, set(node["inputs"]) - known)
        required = set(definition["input"].get("required", {}))
        assert required <= set(node["inputs"]), (node_id, required - set(node["inputs"]))
        for value in node["inputs"].values():
            if isinstance(value, list):
                source = api[value[0]]
                assert value[1] < len(info[source["class_type"]]["output"])
    ui = load_ui_workflow(name)
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    for node in ui["nodes"]:
        definition = info[node["type"]]
        for slot in node["inputs"]:
            assert slot["name"] in input_names(definition)
        outputs = [o["type"] for o in node["outputs"]]
        if node["type"] in PACK_NODES:
            assert outputs == definition["output"], node["type"]
        else:  # ComfyUI's own nodes gain outputs over releases (Save/Preview Image's from v0.26.0); linked ones count
            linked = {i: o["type"] for i, o in enumerate(node["outputs"]) if o.get("links")}
            assert linked == {i: t for i, t in enumerate(definition["output"]) if i in linked}, node["type"]
        # what the frontend reads to say which missing model goes where: a widget's file, in a real model folder
        for model in node.get("properties", {}).get("models", []):
            assert model["name"] in node["widgets_values"] and model["url"].startswith("https://")
            assert model["directory"] in get(server["url"], "/models")


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_api_workflows_are_the_ui_workflows_converted_by_the_node_definitions(server, name):
    """The frontend's own reading of `widgets_values` (from the live definitions) gives the API twin, and agrees with
    the definition-free reading the dev test uses."""
    info = get(server["url"], "/object_info")
    ui = load_ui_workflow(name)
    api = json.loads((REPO_ROOT / f"workflows/api/{name}.json").read_text())
    assert api_from_ui(ui, lambda node: widget_slots_from_definition(info[node["type"]])) == strip_meta(api)
    for node in ui["nodes"]:
        from_api = widget_slots_from_api_node(node["type"], api[str(node["id"])]["inputs"])
        assert from_api == widget_slots_from_definition(info[node["type"]]), node["type"]


def saved_controls(ui: dict, info: dict) -> dict[tuple[str, str], str]:
    """(node id, widget) -> the "control after generate" the UI workflow saves for that widget."""
    controls = {}
    for node in ui["nodes"]:
        slots = widget_slots_from_definition(info[node["type"]])
        for index, (slot, value) in enumerate(zip(slots, node["widgets_values"])):
            if slot is None and value in CONTROL_MODES:
                controls[(str(node["id"]), slots[index - 1])] = value
    return controls


def executed_nodes(result: dict) -> set[str]:
    """The nodes of a finished prompt that ran rather than came from ComfyUI's cache."""
    cached = {node for kind, data in result["status"]["messages"] if kind == "execution_cached" for node in data["nodes"]}
    return set(result["prompt"][2]) - cached


def test_a_second_queue_reruns_only_the_sampler_side(server):
    """Extract Face Features' seed is "fixed" after generate (the frontend would randomize an INT named seed), so
    queueing the graph again with a new sampler seed leaves detection, CLIP and MFF in the cache."""
    info = get(server["url"], "/object_info")
    assert info["IDAdapterExtractFaceFeatures"]["input"]["required"]["seed"][1]["control_after_generate"] == "fixed"
    controls = saved_controls(load_ui_workflow("idadapter_sd15"), info)
    assert controls[("5", "seed")] == "fixed" and set(controls.values()) == {"fixed"}, controls
    first = run_prompt(server, sd15_prompt(KSampler={"seed": 1}))
    second = run_prompt(server, sd15_prompt(KSampler={"seed": 2}))
    assert first["status"]["status_str"] == second["status"]["status_str"] == "success"
    prompt = second["prompt"][2]
    ran = {prompt[node_id]["class_type"] for node_id in executed_nodes(second)}
    assert ran == {"KSampler", "VAEDecode", "SaveImage", "IDAdapterFaceSimilarity", "PreviewAny"}


def test_every_node_has_a_help_page_the_server_serves(server, comfy_pack):
    """The frontend fetches a custom node's help from /extensions/<custom_nodes folder>/docs/<node id>.md (after a
    /<node id>/<locale>.md it does not find); the pack's WEB_DIRECTORY holds them."""
    extension = asyncio.run(comfy_pack.comfy_entrypoint())
    node_ids = {node.define_schema().node_id for node in asyncio.run(extension.get_node_list())}
    assert node_ids == PACK_NODES
    info = get(server["url"], "/object_info")
    web = REPO_ROOT / comfy_pack.WEB_DIRECTORY
    for node_id in sorted(node_ids):
        module = info[node_id]["python_module"].split(".")
        assert module[0] == "custom_nodes", info[node_id]["python_module"]
        with urllib.request.urlopen(f"{server['url']}/extensions/{module[1]}/docs/{node_id}.md", timeout=30) as response:
            assert "text/html" not in response.headers["Content-Type"]
            assert response.read() == (web / "docs" / f"{node_id}.md").read_bytes()


def test_full_graph_runs_and_saves_an_image(server):
    result = run_prompt(server, sd15_prompt())
    assert result.get("status", {}).get("status_str") == "success", result
    images = result["outputs"]["14"]["images"]
    assert (server["base"] / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()
    assert result["outputs"]["15"]["images"]  # the aligned-face preview


def test_two_people_graph_runs_and_saves_an_image(server):
    """Two Apply IDAdapter chained on one MODEL, each with its half of the image as mask, and each identity prompt
    masked to the same half (ConditioningSetMask + ConditioningCombine)."""
    prompt = two_people_prompt()
    applies = [node for node in prompt.values() if node["class_type"] == "IDAdapterApply"]
    assert len(applies) == 2 and all("mask" in node["inputs"] for node in applies)
    result = run_prompt(server, prompt)
    assert result.get("status", {}).get("status_str") == "success", result
    (saved,) = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    image = result["outputs"][saved]["images"][0]
    assert (server["base"] / "output" / image["subfolder"] / image["filename"]).is_file()


@pytest.mark.parametrize("overrides,expected", [
    ({"IDAdapterLoader": {"adapter_name": "wrong-base.safetensors"}}, "but the model is SD15"),
    ({"IDAdapterLoader": {"adapter_name": "corrupt.safetensors"}}, "truncated"),
    ({"LoadImage": {"image": "noface.png"}}, "no usable face"),
])
def test_bad_inputs_fail_the_prompt_with_a_clear_message_and_the_server_lives_on(server, overrides, expected):
    result = run_prompt(server, sd15_prompt(**overrides))
    assert result["status"]["status_str"] == "error"
    assert expected in error_message(result), error_message(result)
    assert "IDAdapterApply" in get(server["url"], "/object_info/IDAdapterApply")


@pytest.mark.parametrize("method,apply_inputs,expected", [
    ("idadapter", {"weight": 3.5}, "Value 3.5 bigger than max of 3.0"),
    ("idadapter", {"weight": float("inf")}, "Value inf bigger than max of 3.0"),
    ("idadapter", {"end_at": -0.5}, "Value -0.5 smaller than min of 0.0"),
    ("inv_adapter", {"weight": float("inf")}, "Value inf bigger than max of 2.0"),
    ("inv_adapter", {"start_at": 1.5}, "Value 1.5 bigger than max of 1.0"),
])
def test_comfyui_checks_the_ranges_of_apply(server, method, apply_inputs, expected):
    """ComfyUI refuses the Apply branch up front (the face preview branch, valid, still runs)."""
    prompt = apply_prompt(method, apply_inputs)
    apply_id = next(key for key, node in prompt.items() if node["class_type"] in ("IDAdapterApply", "InvAdapterApply"))
    body = json.dumps({"prompt": prompt, "client_id": "idadapter-tests"}).encode()
    request = urllib.request.Request(server["url"] + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        answer = json.loads(err.read())
    errors = answer["node_errors"][apply_id]["errors"]
    assert [e["message"] for e in errors] == [expected]


@pytest.mark.parametrize("method,apply_inputs,expected", [
    ("idadapter", {"weight": float("nan")}, "weight is nan; it must be a finite number."),
    ("idadapter", {"start_at": 0.8, "end_at": 0.2}, "start_at (0.8) is after end_at (0.2)"),
    ("inv_adapter", {"weight": float("nan")}, "weight is nan; it must be a finite number."),
    ("inv_adapter", {"start_at": 0.8, "end_at": 0.2}, "start_at (0.8) is after end_at (0.2)"),
])
def test_what_comfyui_cannot_check_fails_with_one_clear_message(server, method, apply_inputs, expected):
    prompt = apply_prompt(method, apply_inputs)
    result = run_prompt(server, prompt)
    assert result["status"]["status_str"] == "error"
    assert error_message(result).count(expected) == 1, error_message(result)


def test_save_name_leaving_the_output_folder_is_refused(server):
    prompt = sd15_prompt()
    prompt["90"] = {"class_type": "IDAdapterSaveIDEmbeds", "inputs": {"id_embeds": ["7", 0], "name": "../../escape"}}
    result = run_prompt(server, prompt)
    assert result["status"]["status_str"] == "error"
    assert "not a plain file name" in error_message(result)
    assert not any(p.name.startswith("escape") for p in server["base"].rglob("*"))


def test_inv_adapter_graph_runs_and_saves_an_image(server):
    result = run_prompt(server, inv_adapter_prompt())
    assert result.get("status", {}).get("status_str") == "success", result
    images = result["outputs"]["12"]["images"]
    assert (server["base"] / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()


@pytest.mark.parametrize("overrides,expected", [
    ({"InvAdapterLoader": {"adapter_name": "wrong-base.safetensors"}}, "but the model is SD15"),
    ({"LoadImage": {"image": "noface.png"}}, "reference image 1/1: no face found"),
    ({"InvAdapterApply": {"inv_adapter": "accept-inv.safetensors"}},
     "Apply Inv-Adapter: the input 'inv_adapter' takes an INV_ADAPTER, but it got the text 'accept-inv.safetensors'"),
])
def test_inv_adapter_bad_inputs_fail_the_prompt_with_a_clear_message(server, overrides, expected):
    result = run_prompt(server, inv_adapter_prompt(**overrides))
    assert result["status"]["status_str"] == "error"
    assert expected in error_message(result), error_message(result)
