"""The node category, the custom socket types this pack's nodes pass between each other, the base class of the pack's
nodes, which refuses a value of the wrong type on one of those sockets, and the inputs both Apply nodes share
(`strength_and_schedule_inputs`, `identity_in_negative_input`).

ComfyUI checks that a link joins sockets of the same type, but an API prompt can put any value where a link belongs
(`"inv_adapter": "accept-inv.safetensors"`): it passes validation and would fail deep inside the node with a raw
AttributeError. `PackNode` checks every input of a pack type before `execute` runs and names what to connect.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from comfy_api.latest import io

from ..idadapter_core.errors import IDAdapterError
from ..idadapter_core.idadapter import IDAdapter, IdentityEmbeds
from ..idadapter_core.inv_adapter import InvAdapter, ReferenceTrajectory
from ..idadapter_core.schedule import NEGATIVE_IDENTITY_MODES

CATEGORY = "IDAdapter"

IDAdapterType = io.Custom("IDADAPTER")
FaceFeaturesType = io.Custom("FACE_FEATURES")
IDEmbedsType = io.Custom("ID_EMBEDS")
InvAdapterType = io.Custom("INV_ADAPTER")
InvReferenceType = io.Custom("INV_REFERENCE")


@dataclass(frozen=True)
class PackType:
    holds: Callable[[object], bool]
    made_by: str
    """The node(s) whose output carries it."""


def _adapter_of(model_class: type) -> Callable[[object], bool]:
    """IDADAPTER and INV_ADAPTER are both a `comfy_binding.LoadedAdapter`; the module it holds tells them apart."""
    return lambda value: isinstance(getattr(value, "model", None), model_class) and hasattr(value, "patcher")


FACE_FEATURE_TENSORS = ("clip_patches", "face_embeds", "clip_image_embeds")


def _has_face_features(value: object) -> bool:
    """Holds the three tensors of a FaceFeatures, the ones Encode Identity reads."""
    return all(isinstance(getattr(value, name, None), torch.Tensor) for name in FACE_FEATURE_TENSORS)


PACK_TYPES: dict[str, PackType] = {
    "IDADAPTER": PackType(_adapter_of(IDAdapter), "Load IDAdapter"),
    "INV_ADAPTER": PackType(_adapter_of(InvAdapter), "Load Inv-Adapter"),
    "FACE_FEATURES": PackType(_has_face_features, "Extract Face Features"),
    "ID_EMBEDS": PackType(lambda value: isinstance(value, IdentityEmbeds), "Encode Identity or Load ID Embeds"),
    "INV_REFERENCE": PackType(lambda value: isinstance(value, ReferenceTrajectory), "Invert Reference"),
}


def describe_value(value: object) -> str:
    """What arrived, in the words of the socket types when it is one of them."""
    for type_name, pack_type in PACK_TYPES.items():
        if pack_type.holds(value):
            return f"an {type_name}"
    if isinstance(value, str):
        return f"the text {value[:60] + '...' if len(value) > 60 else value!r}"
    return f"a {type(value).__name__}"


def check_pack_input(node: str, name: str, type_name: str, value: object) -> None:
    """Refuse `value` on the input `name` of `node` unless it is what the socket type `type_name` carries."""
    pack_type = PACK_TYPES[type_name]
    if not pack_type.holds(value):
        raise IDAdapterError(
            f"{node}: the input '{name}' takes an {type_name}, but it got {describe_value(value)}. Connect the "
            f"{type_name} output of {pack_type.made_by} to it (in an API prompt, a link [node id, output index], "
            "not a file name or other value)."
        )


class PackNode(io.ComfyNode):
    """A node of this pack: before `execute` runs, every input of one of the pack's socket types (PACK_TYPES) that
    was given is checked (`check_pack_input`)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        execute = vars(cls).get("execute")
        if isinstance(execute, classmethod) and not getattr(execute.__func__, "checks_pack_inputs", False):
            cls.execute = classmethod(_checking_pack_inputs(execute.__func__))


def _checking_pack_inputs(execute: Callable) -> Callable:
    signature = inspect.signature(execute)
    # (node name, input name, socket type) of the node's pack-typed inputs, read from its schema at the first call
    # (define_schema lists model folders; the sockets never change)
    pack_inputs: list[tuple[str, str, str]] | None = None

    @functools.wraps(execute)
    def checked(cls, *args, **kwargs):
        nonlocal pack_inputs
        if pack_inputs is None:
            schema = cls.define_schema()
            node = schema.display_name or schema.node_id
            pack_inputs = [(node, s.id, s.get_io_type()) for s in schema.inputs if s.get_io_type() in PACK_TYPES]
        inputs = signature.bind(cls, *args, **kwargs).arguments
        for node, name, type_name in pack_inputs:
            if inputs.get(name) is not None:
                check_pack_input(node, name, type_name, inputs[name])
        return execute(cls, *args, **kwargs)

    checked.checks_pack_inputs = True
    return checked


def identity_in_negative_input() -> io.Combo.Input:
    """Apply's advanced `identity_in_negative`: guidance over the identity (the default) or the identity on both
    halves of classifier-free guidance (README, "Guidance over the identity")."""
    return io.Combo.Input(
        "identity_in_negative", options=list(NEGATIVE_IDENTITY_MODES), default=NEGATIVE_IDENTITY_MODES[0],
        optional=True, advanced=True,
        tooltip="'none (guided)': the negative prompt's half of each step gets no identity (as the weights were "
                "trained to see it), so the KSampler's cfg scales the identity too. 'same as positive': both halves "
                "get the identity, so cfg amplifies only the prompt.",
    )


def strength_and_schedule_inputs(weight_range: tuple[float, float], weight_tooltip: str, acting: str) -> list[io.Input]:
    """The inputs both Apply nodes share, in their order: `weight` (each method's range and meaning), `start_at` and
    `end_at` (where in the sampling schedule `acting` acts) and the region `mask`."""
    low, high = weight_range
    return [
        io.Float.Input("weight", default=1.0, min=low, max=high, step=0.05, tooltip=weight_tooltip),
        io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip=f"Fraction of the sampling schedule where {acting} starts acting."),
        io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip=f"Fraction of the sampling schedule where {acting} stops acting."),
        io.Mask.Input("mask", optional=True,
                      tooltip="Where this identity goes (1) and where not (0), any size: resized to the image. "
                              "Chain one Apply per person, each with its own mask, for several people in one image."),
    ]
