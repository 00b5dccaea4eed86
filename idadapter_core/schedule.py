"""When, where and how strongly an adapter acts during sampling, shared by every method and both hosts.

`AdapterStrength` turns the user's weight into the scale of each part: the adapter's residual (β of IDAdapter
eq. 7) and the trained cross-attention K/V differences. By default the weight scales both, so 0 turns the method
off; with `kv_follows_weight=False` the K/V differences stay at full strength and β scales only the adapter, the
paper's form (docs/DESIGN.md §2.4). `StepWindow` is the part of the schedule it acts on, as noise levels, and
`adapter_blocks` the transformer blocks it runs in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import IDAdapterError
from .presets import UNetLayout

BLOCK_MODES = ("all", "skip highest resolution")
"""`all`: the adapter in every transformer block (the paper). `skip highest resolution`: not in the blocks of the
UNet's highest-resolution level, which hold the most visual tokens and so most of the adapter's cost (our faster
mode, not the paper's; README "Speed" gives its cost)."""

NEGATIVE_IDENTITY_MODES = ("none (guided)", "same as positive")
"""What the negative (unconditional) half of classifier-free guidance gets. `none (guided)`: the null identity, as
identity dropout trains it (IDAdapter: E_r = 0, the trained K/V kept; Inv-Adapter: the EAA off), so the cfg scale
pushes towards the reference as it pushes towards the prompt (IP-Adapter based packs give the negative half a null
image embedding likewise). `same as positive`: both halves get the identity, so guidance amplifies only the prompt
(and IDAdapter's identity token); the pack's behaviour before guidance over the identity existed."""


def identity_in_negative(mode: str) -> bool:
    """Whether the negative half of classifier-free guidance gets the identity, for a mode of
    `NEGATIVE_IDENTITY_MODES`."""
    if mode not in NEGATIVE_IDENTITY_MODES:
        raise IDAdapterError(f"unknown identity_in_negative '{mode}'; use one of: {', '.join(NEGATIVE_IDENTITY_MODES)}")
    return mode == NEGATIVE_IDENTITY_MODES[1]


def require_finite(**values: float) -> None:
    """Refuse NaN and infinities (they reach nodes through the API and make black images without a word)."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise IDAdapterError(f"{name} is {value}; it must be a finite number.")


def check_schedule(start_at: float, end_at: float) -> None:
    """start_at and end_at are fractions of the sampling schedule, the start not after the end."""
    require_finite(start_at=start_at, end_at=end_at)
    if start_at > end_at:
        raise IDAdapterError(
            f"start_at ({start_at}) is after end_at ({end_at}); the adapter acts from start_at to end_at of the "
            "schedule, so set start_at <= end_at."
        )


@dataclass(frozen=True)
class AdapterStrength:
    weight: float
    kv_follows_weight: bool = True

    def __post_init__(self) -> None:
        require_finite(weight=self.weight)

    @property
    def adapter_scale(self) -> float:
        return self.weight

    @property
    def kv_scale(self) -> float:
        """The trained K/V differences enter as W + kv_scale · ΔW."""
        return self.weight if self.kv_follows_weight else 1.0

    @property
    def is_off(self) -> bool:
        return self.adapter_scale == 0 and self.kv_scale == 0


class StepWindow:
    """The steps whose noise level lies in [sigma_end, sigma_start]. The step's sigma is read once per step (a
    device sync) and the answer kept for every block of that step; every patch of one Apply shares one window."""

    def __init__(self, sigma_start: float, sigma_end: float) -> None:
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self._step_sigmas: torch.Tensor | None = None
        self._step_inside = False

    def contains(self, sigmas: torch.Tensor | None) -> bool:
        """Whether the step with these sigmas (None: outside a sampler, e.g. a direct UNet call) is inside."""
        if sigmas is None:
            return True
        if sigmas is not self._step_sigmas:
            sigma = float(sigmas.detach().max())
            self._step_sigmas, self._step_inside = sigmas, self.sigma_end <= sigma <= self.sigma_start
        return self._step_inside

    def reset(self) -> None:
        self._step_sigmas = None


def adapter_blocks(layout: UNetLayout, mode: str) -> frozenset[int]:
    """The forward-order indices of the transformer blocks the adapter runs in, for a mode of `BLOCK_MODES`. The
    highest-resolution level is the one of the narrowest blocks (320 channels in SD1.x/2.x, 640 in SDXL)."""
    if mode not in BLOCK_MODES:
        raise IDAdapterError(f"unknown block mode '{mode}'; use one of: {', '.join(BLOCK_MODES)}")
    if mode == "all":
        return frozenset(range(layout.num_blocks))
    narrowest = min(layout.block_channels)
    return frozenset(i for i, channels in enumerate(layout.block_channels) if channels != narrowest)
