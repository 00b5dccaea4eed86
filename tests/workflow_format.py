"""The shipped workflows in both formats: a UI workflow (what the frontend saves and the templates browser opens, in
`example_workflows/`) converted to API form (what `/prompt` takes, in `workflows/api/`), and the rectangles its nodes
cover on the canvas.

A UI node keeps its widget values as a list, `widgets_values`, in the order of its node definition's widget inputs,
with one extra value after each widget the frontend gives a companion: the "control after generate" choice after a
seed, the upload button after Load Image's file. `widget_slots_*` name each position (None for a companion).
"""
from __future__ import annotations

from collections.abc import Callable

SEED_NAMES = ("seed", "noise_seed")
"""INT inputs the frontend gives a "control after generate" widget unless their definition says otherwise."""
CONTROL_MODES = ("fixed", "increment", "decrement", "randomize")
"""The values of a "control after generate" widget."""
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
TITLE_HEIGHT = 30
"""LiteGraph draws a node's title bar above its `pos`."""
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
IMAGE_PREVIEW_HEIGHT = 240
"""Room the frontend needs below the widgets of a node that shows an image (a loaded photo, a saved or previewed one)."""
TEXT_BOX_HEIGHT = 100
"""Room for a multi-line text box: a prompt, or the text Preview as Text shows once the graph has run."""
IMAGE_NODES = ("LoadImage", "SaveImage", "PreviewImage")
TEXT_BOX_NODES = ("CLIPTextEncode", "IDAdapterIdentityPrompt", "PreviewAny")

WidgetSlots = list[str | None]


def widget_slots_from_definition(definition: dict) -> WidgetSlots:
    """The widget positions of a node from its `/object_info` definition, by the frontend's rules."""
    slots: WidgetSlots = []
    for section in ("required", "optional"):
        for name in definition.get("input_order", {}).get(section, []):
            spec = definition["input"][section][name]
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            slots.append(name)
            if options.get("image_upload"):
                slots.append(None)
            if options.get("control_after_generate", name in SEED_NAMES):
                slots.append(None)
    return slots


def widget_slots_from_api_node(class_type: str, api_inputs: dict) -> WidgetSlots:
    """The widget positions of a node from its API twin's unlinked inputs (written in definition order), assuming the
    frontend's defaults: a control after each seed, an upload button after Load Image's file. The host test checks
    that this agrees with `widget_slots_from_definition` for every node the workflows use."""
    slots: WidgetSlots = []
    for name, value in api_inputs.items():
        if isinstance(value, list):
            continue
        slots.append(name)
        if name in SEED_NAMES or (class_type == "LoadImage" and name == "image"):
            slots.append(None)
    return slots


def api_from_ui(ui: dict, widget_slots: Callable[[dict], WidgetSlots]) -> dict:
    """`{node id: {"class_type", "inputs"}}`: each link becomes `[source id, output index]` on the input it enters,
    each widget value an input named by `widget_slots(ui_node)`."""
    nodes = {node["id"]: node for node in ui["nodes"]}
    prompt = {}
    for node in ui["nodes"]:
        values = node.get("widgets_values", [])
        slots = widget_slots(node)
        if len(slots) != len(values):
            raise ValueError(f"node {node['id']} ({node['type']}) has {len(values)} widget values for slots {slots}")
        inputs = {name: value for name, value in zip(slots, values) if name is not None}
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    for _, source, source_slot, target, target_slot, _ in ui["links"]:
        name = nodes[target]["inputs"][target_slot]["name"]
        prompt[str(target)]["inputs"][name] = [str(source), source_slot]
    return prompt


def strip_meta(api: dict) -> dict:
    """An API workflow without the `_meta` titles ComfyUI ignores when it runs a prompt."""
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in api.items()}


def min_body_height(node: dict) -> int:
    """A lower bound of the height the frontend gives a node below its title: a row per socket (inputs and outputs
    side by side), a row per widget value, and the image or text box the node shows."""
    sockets = max(len(node.get("inputs", [])), len(node.get("outputs", [])))
    height = SLOT_HEIGHT * sockets + WIDGET_HEIGHT * len(node.get("widgets_values", [])) + 10
    if node["type"] in IMAGE_NODES:
        height += IMAGE_PREVIEW_HEIGHT
    if node["type"] in TEXT_BOX_NODES:
        height += TEXT_BOX_HEIGHT
    return height


def node_rectangle(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) on the canvas, title bar included."""
    x, y = node["pos"]
    width, height = node["size"]
    return x, y - TITLE_HEIGHT, x + width, y + height


def overlapping_nodes(ui: dict) -> list[tuple[int, int]]:
    """Pairs of node ids whose rectangles intersect."""
    rectangles = [(node["id"], node_rectangle(node)) for node in ui["nodes"]]
    pairs = []
    for index, (first, (l1, t1, r1, b1)) in enumerate(rectangles):
        for second, (l2, t2, r2, b2) in rectangles[index + 1:]:
            if l1 < r2 and l2 < r1 and t1 < b2 and t2 < b1:
                pairs.append((first, second))
    return pairs
