"""UNet layouts the adapters are built for, and the one place that decides which base a UNet is.

A layout lists the UNet's transformer blocks in forward order (input/down blocks, middle block,
output/up blocks; depth inside a block last) — the index both hosts and both methods use
(docs/DESIGN.md, "Block indexing"). Each host walks its own UNet and names it with `identify_layout`;
weights are checked against a model with `check_layout`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import IncompatibleWeightsError


@dataclass(frozen=True)
class UNetLayout:
    """What the adapters need to know about a UNet: one (channels, heads) pair per transformer block."""

    base: str
    block_channels: tuple[int, ...]
    block_heads: tuple[int, ...]
    context_dim: int
    text_widths: dict[str, int] = field(default_factory=dict)
    """Token-embedding width of each text encoder, keyed as ComfyUI keys them (`l`, `h`, `g`)."""
    prediction: str = "epsilon"

    def __post_init__(self) -> None:
        if len(self.block_channels) != len(self.block_heads):
            raise ValueError("block_channels and block_heads must have one entry per transformer block")

    @property
    def num_blocks(self) -> int:
        return len(self.block_channels)

    def describe(self) -> str:
        return f"{self.base} (context {self.context_dim}, {self.num_blocks} transformer blocks)"

    def same_shape_as(self, other: "UNetLayout") -> bool:
        return (
            tuple(self.block_channels) == tuple(other.block_channels)
            and tuple(self.block_heads) == tuple(other.block_heads)
            and self.context_dim == other.context_dim
        )

    def differences(self, other: "UNetLayout") -> list[str]:
        """How this layout's shape differs from `other`'s, in words (empty when they are the same shape)."""
        found = []
        if self.num_blocks != other.num_blocks:
            def widths(layout: UNetLayout) -> str:
                return "/".join(str(c) for c in sorted(set(layout.block_channels)))

            found.append(
                f"{self.num_blocks} vs {other.num_blocks} transformer blocks (widths {widths(self)} vs {widths(other)})"
            )
        else:
            for what, mine, theirs in (("width", self.block_channels, other.block_channels),
                                       ("heads", self.block_heads, other.block_heads)):
                index = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
                if index is not None:
                    found.append(f"block {index} has {what} {mine[index]} vs {theirs[index]}")
        if self.context_dim != other.context_dim:
            found.append(f"text context width {self.context_dim} vs {other.context_dim}")
        return found

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UNetLayout":
        data = json.loads(text)
        return cls(
            base=data["base"],
            block_channels=tuple(data["block_channels"]),
            block_heads=tuple(data["block_heads"]),
            context_dim=int(data["context_dim"]),
            text_widths=dict(data.get("text_widths", {})),
            prediction=data.get("prediction", "epsilon"),
        )


def _sd_layout(base: str, context_dim: int, heads_for, text_widths: dict[str, int], prediction: str = "epsilon") -> UNetLayout:
    # SD1.x/2.x: one transformer block in each of the 6 attention input blocks, the middle block and the
    # 9 attention output blocks.
    channels = (320, 320, 640, 640, 1280, 1280) + (1280,) + (1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
    return UNetLayout(base, channels, tuple(heads_for(c) for c in channels), context_dim, text_widths, prediction)


def _sdxl_layout() -> UNetLayout:
    # SDXL: input levels 640 (depth 2) x2 and 1280 (depth 10) x2, middle 1280 (depth 10),
    # output 1280 (depth 10) x3 and 640 (depth 2) x3: 4 + 20 + 10 + 30 + 6 = 70 blocks.
    channels = (640,) * 4 + (1280,) * 20 + (1280,) * 10 + (1280,) * 30 + (640,) * 6
    return UNetLayout("sdxl", channels, tuple(c // 64 for c in channels), 2048, {"l": 768, "g": 1280})


PRESETS: dict[str, UNetLayout] = {
    "sd15": _sd_layout("sd15", 768, lambda c: 8, {"l": 768}),
    "sd21": _sd_layout("sd21", 1024, lambda c: c // 64, {"h": 1024}),
    "sd21-v": _sd_layout("sd21-v", 1024, lambda c: c // 64, {"h": 1024}, prediction="v_prediction"),
    "sdxl": _sdxl_layout(),
}


def get_preset(base: str) -> UNetLayout:
    try:
        return PRESETS[base]
    except KeyError:
        raise KeyError(f"unknown base model '{base}'; known bases: {', '.join(PRESETS)}") from None


def match_preset(layout: UNetLayout, prediction: str | None = None) -> UNetLayout | None:
    """The preset with the same block shapes as `layout`, if any. sd21 and sd21-v share their shapes: the one
    whose prediction type is `prediction` wins, else the first."""
    matches = [preset for preset in PRESETS.values() if preset.same_shape_as(layout)]
    if not matches:
        return None
    return next((preset for preset in matches if preset.prediction == prediction), matches[0])


def identify_layout(
    block_channels: tuple[int, ...], block_heads: tuple[int, ...], context_dim: int, *,
    prediction: str | None = None, text_widths: dict[str, int] | None = None, unknown_base: str = "custom",
) -> UNetLayout:
    """The layout of a UNet a host has walked: the matching preset, else a layout named `unknown_base` with one
    text encoder ('l', ComfyUI's key for SD1-style CLIP) as wide as the context unless `text_widths` says otherwise.
    Both host bindings name their UNets through this, so a UNet is the same base in ComfyUI and in diffusers."""
    layout = UNetLayout(
        unknown_base, tuple(block_channels), tuple(block_heads), context_dim,
        dict(text_widths or {"l": context_dim}), prediction or "epsilon",
    )
    return match_preset(layout, prediction) or layout


def check_layout(
    weights_layout: UNetLayout, model_layout: UNetLayout | None, source: str, method: str = "IDAdapter",
    require_known_base: bool = True,
) -> None:
    """Refuse weights whose UNet layout differs from the model's (or, without a model, from their preset).
    With `require_known_base=False` a base without a preset passes here, to be checked once the model is known.
    `source` names the weights and `method` the kind of weights in the message."""
    if model_layout is None:
        preset = PRESETS.get(weights_layout.base)
        if preset is None:
            if not require_known_base:
                return
            raise IncompatibleWeightsError(
                f"{source} is for an unknown base '{weights_layout.base}'; known bases: {', '.join(PRESETS)}. "
                "Pass the model it is meant for to validate it."
            )
        if not preset.same_shape_as(weights_layout):
            raise IncompatibleWeightsError(
                f"{source} says base '{weights_layout.base}' but its blocks do not match that preset "
                f"(file: {weights_layout.describe()}, preset: {preset.describe()})."
            )
        return
    if not weights_layout.same_shape_as(model_layout):
        if model_layout.base in PRESETS and model_layout.base != weights_layout.base:
            advice = f"use {method} weights trained for {model_layout.base}"
        else:
            advice = f"use {method} weights trained for a UNet of this model's layout"
        raise IncompatibleWeightsError(
            f"{source} is for {weights_layout.describe()}, but the model is {model_layout.describe()} "
            f"(weights vs model: {'; '.join(weights_layout.differences(model_layout))}); {advice}."
        )
