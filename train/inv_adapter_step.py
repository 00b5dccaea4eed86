"""One training step of Inv-Adapter (docs/DESIGN.md §3): only the EAA trains, on the diffusion loss.

Per sample: a target image of an identity and one other image of it as the reference (the target itself when the
identity has a single image). The reference's features come from a reference pass of the frozen UNet at the target's
timestep, on the null prompt, and enter the generation pass through the EAA. Where the reference latent at that
timestep comes from is a choice (`reference_features`, our inference, DESIGN.md §3.2 [I]):
- "inversion" (default): the point of its DDIM inversion (null prompt, `inversion_steps` steps) nearest to the
  timestep, as Apply Inv-Adapter takes it at inference. Each reference is inverted once per run, the first time it
  is drawn, and kept (`TrajectoryStore`: on disk under the run's output folder, so memory does not grow with the
  references and a resumed run inverts nothing again) — the "precompute inversion trajectories" of DESIGN.md §3.2.
  A step's new references are inverted together, as one batch through the UNet: on the identity miniature's UNet
  (CPU, one thread, 20 steps) a batch of 16 took 1.4-1.9 s where 16 one at a time took 7.4-8.1 s (4.0-5.6 times
  faster, 5 rounds, 2026-12-07).
  In the identity miniature it carried more identity than forward noising (0.95 ± 0.02 vs 0.87 ± 0.10, README);
- "noised": the reference latent forward-noised to the timestep, z_t = sqrt(ᾱ_t)·z_0 + sqrt(1 − ᾱ_t)·ε — the cheap
  stand-in for an inversion trajectory (both are latents at the same noise level; no inversion to run).
Inv-Adapter needs no identity dropout: its "without identity" input is the frozen model with the EAA off, which is
exact by construction (guidance over the identity runs the negative CFG half so), so there is nothing to learn for it. A face-ID loss is not part of this method (the paper's losses are unknown; ours: diffusion only).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from idadapter_core.hosts import DiffusersInvAdapter, diffusers_denoiser
from idadapter_core.inv_adapter import InvAdapter, ddim_invert, inversion_sigmas
from idadapter_core.weights import atomic_write

from .config import REFERENCE_FEATURES
from .models import BaseModel


@dataclass
class InvAdapterBatch:
    latents: torch.Tensor
    """(B, C, h, w) scaled VAE latents of the targets."""
    noise: torch.Tensor
    timesteps: torch.Tensor
    reference_latents: torch.Tensor
    """(B, C, h, w) scaled VAE latents of each sample's reference image."""
    reference_noise: torch.Tensor
    reference_rows: list[int]
    """Cache rows of the references (keys of the inversion cache)."""
    token_ids: dict[str, torch.Tensor]
    null_token_ids: dict[str, torch.Tensor]
    time_ids: torch.Tensor


@dataclass
class _Frozen:
    """Not a module: DDP and `parameters()` see the EAA alone."""

    base: BaseModel
    binding: DiffusersInvAdapter


class InvAdapterTrainingStep(nn.Module):
    """forward(batch) -> the step's losses; the only registered submodule is the EAA (`adapter`)."""

    def __init__(self, adapter: InvAdapter, base: BaseModel, reference_features: str = "inversion",
                 inversion_steps: int = 50, trajectory_folder: Path | None = None) -> None:
        super().__init__()
        if reference_features not in REFERENCE_FEATURES:
            raise ValueError(f"reference_features must be one of {REFERENCE_FEATURES}, got '{reference_features}'")
        if reference_features == "inversion" and trajectory_folder is None:
            raise ValueError("reference_features 'inversion' keeps each reference's inversion on disk: pass a "
                             "trajectory_folder")
        self.adapter = adapter
        self.frozen = _Frozen(base, DiffusersInvAdapter(base.unet, adapter))
        self.reference_features = reference_features
        self.inversion_steps = inversion_steps
        self.trajectories = None if trajectory_folder is None else TrajectoryStore(trajectory_folder)

    def forward(self, batch: InvAdapterBatch) -> dict[str, torch.Tensor]:
        base = self.frozen.base
        unet_dtype = base.unet.dtype
        null_context, null_pooled = base.text.encode(batch.null_token_ids)
        context, pooled = base.text.encode(batch.token_ids)
        with torch.no_grad():
            reference_added = {"text_embeds": null_pooled, "time_ids": batch.time_ids} if base.is_sdxl else None
            reference = self._reference_inputs(batch, null_context, reference_added)
            features = self.frozen.binding.record_reference(
                reference.to(unet_dtype), batch.timesteps, null_context.to(unet_dtype), added_cond_kwargs=reference_added
            )
        self.frozen.binding.set_reference(features)
        diffusion = base.denoise(batch.latents, batch.noise, batch.timesteps, context, pooled, batch.time_ids).loss
        return {"diffusion_loss": diffusion, "loss": diffusion}

    def release(self) -> None:
        """Free the step's projected reference features once its backward has run."""
        self.frozen.binding.set_reference(None)

    def _reference_inputs(self, batch: InvAdapterBatch, null_context: torch.Tensor,
                          added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The references' UNet inputs at each sample's timestep (`added`: SDXL's pooled text and size conditioning
        of the reference pass, per sample)."""
        scheduler = self.frozen.base.noise_scheduler
        if self.reference_features == "noised":
            return scheduler.add_noise(batch.reference_latents, batch.reference_noise, batch.timesteps)
        alphas = scheduler.alphas_cumprod.to(batch.latents.device)
        first_sample: dict[int, int] = {}
        for i, row in enumerate(batch.reference_rows):
            first_sample.setdefault(row, i)
        new_rows = [row for row in first_sample if not self.trajectories.has(row)]
        if new_rows:
            samples = [first_sample[row] for row in new_rows]
            new_added = None if added is None else {name: value[samples] for name, value in added.items()}
            self.trajectories.keep(new_rows, *self._invert(batch.reference_latents[samples], null_context[samples],
                                                           new_added))
        return torch.cat([self.trajectories.point(row, float(alphas[timestep])).to(batch.latents)
                          for row, timestep in zip(batch.reference_rows, batch.timesteps.tolist())])

    def _invert(self, latents: torch.Tensor, null_context: torch.Tensor,
                added: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, trajectories (K + 1, B, C, h, w)) of a batch of reference latents, through the plain UNet."""
        self.frozen.binding.weight, weight = 0.0, self.frozen.binding.weight
        try:
            return invert_latent(self.frozen.base, latents, null_context, self.inversion_steps,
                                 **({} if added is None else {"added_cond_kwargs": added}))
        finally:
            self.frozen.binding.weight = weight


class TrajectoryStore:
    """Each reference's DDIM inversion trajectory, kept in `folder` once made: one safetensors file per cache row (σ
    of each point in float32, the trajectory in float16: 1.7 MB a reference at 512² with 50 steps), written atomically
    and read one point at a time, so memory does not grow with the references. The folder belongs to one base model,
    cache and step count (`train.fit.trajectory_folder` names it after them)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def has(self, row: int) -> bool:
        return self._path(row).is_file()

    def keep(self, rows: list[int], sigmas: torch.Tensor, trajectories: torch.Tensor) -> None:
        """Store the trajectories (K + 1, len(rows), C, h, w) of references `rows`, one file each."""
        for column, row in enumerate(rows):
            tensors = {"sigmas": sigmas.float().cpu(),
                       "trajectory": trajectories[:, column : column + 1].half().cpu().contiguous()}
            atomic_write(self._path(row), lambda tmp: save_file(tensors, tmp, metadata={
                "content": "Inv-Adapter reference DDIM inversion"}))

    def point(self, row: int, alpha: float) -> torch.Tensor:
        """(1, C, h, w): the UNet input at the timestep whose ᾱ is `alpha` (`trajectory_input`) of kept reference
        `row`."""
        with safe_open(str(self._path(row)), framework="pt") as stored:
            index = nearest_point(stored.get_tensor("sigmas"), alpha)
            return stored.get_slice("trajectory")[index].float() * alpha**0.5

    def _path(self, row: int) -> Path:
        return self.folder / f"{row}.safetensors"


def invert_latent(base: BaseModel, latents: torch.Tensor, null_context: torch.Tensor, steps: int,
                  **unet_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ of each point, trajectories (K + 1, B, C, h, w)): the DDIM inversion of `latents` (B, C, h, w), as the UNet
    takes them, on the null prompt (`null_context`, one row per latent), in `steps` steps, through `base.unet` as it
    is (the caller makes sure it runs without a reference)."""
    unet = base.unet
    denoise, schedule = diffusers_denoiser(unet, base.noise_scheduler.alphas_cumprod, base.prediction_type,
                                           null_context.to(unet.dtype), **unet_kwargs)
    sigmas = inversion_sigmas(schedule, steps)
    return sigmas, ddim_invert(lambda x, s: denoise(x.to(unet.dtype), s).float(), latents.float(), sigmas)


def nearest_point(sigmas: torch.Tensor, alpha: float) -> int:
    """The index of the inversion point nearest (in log σ) to a timestep whose ᾱ is `alpha`."""
    return int((sigmas.log() - torch.tensor(((1 - alpha) / alpha) ** 0.5).log()).abs().argmin())


def trajectory_input(sigmas: torch.Tensor, trajectory: torch.Tensor, alpha: float) -> torch.Tensor:
    """The inversion point nearest to a timestep whose ᾱ is `alpha`, as the UNet's input there:
    x_σ -> z_t = x_σ·sqrt(ᾱ_t)."""
    return trajectory[nearest_point(sigmas, alpha)] * alpha**0.5


def eaa_gate_values(adapter: InvAdapter) -> dict[str, float]:
    """tanh(γ) of every block's self-attention gate and the size of its cross branch's value projection."""
    values = {}
    for index, block in enumerate(adapter.blocks):
        values[f"gates/self/{index:02d}"] = float(torch.tanh(block.self_gate.detach().float()))
        values[f"cross_v_norm/{index:02d}"] = float(block.cross_v.weight.detach().float().norm())
    return values
