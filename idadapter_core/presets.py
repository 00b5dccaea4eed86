"""UNet layouts the adapters are built for.

A layout lists the UNet's transformer blocks in forward order (input/down blocks, middle block,
output/up blocks; depth inside a block last) — the index both hosts use (DESIGN.md, "Block indexing").
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


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


def guess_base(layout: UNetLayout) -> str | None:
    """Name of the preset with the same block shapes, if any (sd21 and sd21-v share one)."""
    for name, preset in PRESETS.items():
        if preset.same_shape_as(layout):
            return name
    return None
