"""DDIM inversion of a reference latent and the lookup of its trajectory during generation (docs/DESIGN.md §3.2).

Written in the k-diffusion parameterisation ComfyUI samples in (x_σ = z_t / sqrt(ᾱ_t), σ = sqrt((1 − ᾱ_t)/ᾱ_t)) over
a denoiser `denoise(x, σ) -> x̂0`, so the same code inverts in ComfyUI (its model returns x̂0 for ε and v models) and in
diffusers (`hosts/diffusers_inv_adapter.py` builds the denoiser from the UNet). Deterministic DDIM run backwards is
Euler in this parameterisation: x_{σ'} = x̂0 + σ'·(x − x̂0)/σ. Which trajectory point feeds the reference pass at a
generation step is our choice [I]: the one at the same noise level ("lock-step", the default), or one fixed timestep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
"""(x at noise level σ, σ) -> predicted clean latent x̂0."""


def inversion_sigmas(schedule_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` + 1 increasing noise levels, evenly spaced in timestep over the model's discrete schedule
    (σ of timesteps 0 … T−1, increasing), from the least noisy to the noisiest."""
    if steps < 1:
        raise ValueError(f"inversion needs at least 1 step, got {steps}")
    sigmas = schedule_sigmas.detach().float().cpu().sort().values
    index = torch.linspace(0, len(sigmas) - 1, steps + 1).round().long()
    return sigmas[index]


def ddim_invert(
    denoise: Denoiser, latent: torch.Tensor, sigmas: torch.Tensor, on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The inverted trajectory (len(sigmas), *latent.shape): the clean latent taken as the point at sigmas[0], then one
    deterministic DDIM step up to each next noise level."""
    x = latent
    points = [x]
    steps = len(sigmas) - 1
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        x0 = denoise(x, sigma)
        x = x0 + (x - x0) * (sigma_next / sigma)
        points.append(x)
        if on_step is not None:
            on_step(i + 1, steps)
    return torch.stack(points)


@dataclass
class ReferenceTrajectory:
    """A reference image inverted with one model: the latents x_σ at increasing noise levels, and the conditioning
    the reference pass runs with (the null prompt's, captured by the host)."""

    sigmas: torch.Tensor
    """(K + 1,) increasing."""
    latents: torch.Tensor
    """(K + 1, B_ref, C, H, W), x_σ as the host's model takes it."""
    conditioning: dict[str, torch.Tensor]
    """What the host passes to its UNet for the null prompt (e.g. ComfyUI's c_crossattn and, for SDXL, y)."""
    model_key: str
    """Which model inverted it: the reference pass must run through the same UNet (a refusal names both)."""

    def index_for(self, sigma: float, timestep_sigma: float | None = None) -> int:
        """The trajectory point for a generation step at noise level `sigma`: the nearest in log σ (lock-step), or,
        with `timestep_sigma` (the σ of a fixed timestep), the nearest to that."""
        target = timestep_sigma if timestep_sigma is not None else sigma
        target = math.log(max(float(target), 1e-8))
        return int((self.sigmas.clamp_min(1e-8).log() - target).abs().argmin())
