"""Train IDAdapter weights on a prepared cache (DESIGN.md §2.5, §2.6), on accelerate.

    python -m train fit --config fit.yaml [--lr 3e-5 --batch-size 4 --resume latest ...]
    accelerate launch --multi_gpu --num_processes 8 -m train fit --config fit.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m train fit --config fit.yaml  (CPU processes)

One step, per sample (train/data.py): E_r and E_c from the N references' cached features; E_r into the adapter of
every UNet transformer block (DiffusersIDAdapter, which also adds the trained cross-attention K/V deltas), E_c in
place of the trigger word's input embedding in the prompt "<caption>, <class word> is <trigger word>"; the target's
latent noised at a uniform timestep; loss = MSE on ε or v (the scheduler's prediction type) + λ·face-ID loss on the
one-step x̂0, decoded by the VAE (λ = 0 skips the decode). Trainable: the IDAdapter module only (MFF, identity MLP,
adapters, K/V deltas); Adam at a constant learning rate (optional warmup; `lr_schedule: cosine` decays it). With
`method: inv-adapter` the same loop trains Inv-Adapter's EAA instead (train/inv_adapter_step.py). The structure is
IP-Adapter's tutorial_train.py: a module whose forward is the loss, one loop with `accelerator.accumulate`, periodic
saves.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from idadapter_core import DiffusersIDAdapter, IDAdapter, clip_encoder_from_transformers, transformer_blocks_in_forward_order
from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig
from idadapter_core.weights import atomic_write

from .cache import TrainCache
from .checkpoints import find_checkpoint, load_checkpoint, save_checkpoint
from .inv_adapter_step import InvAdapterBatch, InvAdapterTrainingStep, eaa_gate_values
from .config import RESOLVED_CONFIG_FILE, ConfigError, FitConfig, add_config_arguments, config_from_args, save_config
from .data import FrozenFeatures, ReferenceKey, Sample, SamplePlan
from .generate import (
    SamplingSettings, generate_identity_images, generate_inv_adapter_images, image_grid, inv_adapter_reference,
)
from .models import (
    BaseModel, ClipVision, TextConditioning, build_face_id_loss, idadapter_config, load_base_model, load_clip_vision,
)

log = logging.getLogger(__name__)

_RESUME_SENSITIVE = ("method", "seed", "batch_size", "gradient_accumulation_steps", "num_refs", "identity_dropout",
                     "random_flip", "resolution", "cache", "lr", "warmup_steps", "lr_schedule", "face_id_weight",
                     "mixed_precision", "reference_features", "inversion_steps")
"""Settings that, changed between a checkpoint and the run resuming it, make the result differ from an uninterrupted
run."""


@dataclass
class TrainingBatch:
    latents: torch.Tensor
    """(B, C, h, w) scaled VAE latents of the targets."""
    noise: torch.Tensor
    timesteps: torch.Tensor
    clip_patches: torch.Tensor
    clip_image_embeds: torch.Tensor
    face_embeds: torch.Tensor
    keep_identity: torch.Tensor
    """(B,) bool; False: the sample trains without its identity (classifier-free guidance dropout)."""
    token_ids: dict[str, torch.Tensor]
    time_ids: torch.Tensor
    """(B, 6) SDXL micro-conditioning (unused by SD1.x/2.x)."""


def assemble_batch(
    samples: list[Sample], features: FrozenFeatures, cache: TrainCache, text: TextConditioning, vae_config,
    num_train_timesteps: int, device: torch.device,
) -> TrainingBatch:
    """The step's tensors. Each sample's latent draw, noise and timestep come from its own generator, so they depend on
    the sample alone (not on the batch it is in, nor on the process)."""
    latents, noise, timesteps, time_ids = draw_targets(samples, features, vae_config, num_train_timesteps)
    references = features.references([s.references for s in samples])
    records = [cache.records[s.row] for s in samples]
    keep = [s.keep_identity for s in samples]
    return TrainingBatch(
        latents=latents.to(device),
        noise=noise.to(device),
        timesteps=timesteps.to(device),
        clip_patches=references["clip_patches"].to(device),
        clip_image_embeds=references["clip_image_embeds"].to(device),
        face_embeds=references["face_embeds"].to(device),
        keep_identity=torch.tensor(keep, device=device),
        token_ids={k: v.to(device) for k, v in text.tokenize([r.caption for r in records],
                                                              [r.class_word for r in records], keep).items()},
        time_ids=time_ids.to(device),
    )


def draw_targets(samples: list[Sample], features: FrozenFeatures, vae_config, num_train_timesteps: int):
    """The samples' scaled latents (drawn from their cached VAE distributions), noise, timesteps and SDXL time ids.
    Each sample's draws come from its own generator, so they depend on the sample alone (not on the batch it is in,
    nor on the process)."""
    latents = features.latents(samples)
    draws, noises, timesteps = [], [], []
    for sample, mean in zip(samples, latents["mean"]):
        generator = torch.Generator().manual_seed(sample.seed)
        draws.append(torch.randn(mean.shape, generator=generator))
        noises.append(torch.randn(mean.shape, generator=generator))
        timesteps.append(torch.randint(0, num_train_timesteps, (), generator=generator))
    shift = vae_config.get("shift_factor") or 0.0
    z = latents["mean"].float() + latents["std"].float() * torch.stack(draws)
    return ((z - shift) * vae_config["scaling_factor"]), torch.stack(noises), torch.stack(timesteps), latents["time_ids"]


def assemble_inv_adapter_batch(
    samples: list[Sample], features: FrozenFeatures, cache: TrainCache, text: TextConditioning, vae_config,
    num_train_timesteps: int, device: torch.device,
) -> InvAdapterBatch:
    """Targets as for IDAdapter; each sample's reference is its first reference that is a real image of the identity
    (augmented copies exist only as face crops), else the target itself, with its own latent draw and noise."""
    latents, noise, timesteps, time_ids = draw_targets(samples, features, vae_config, num_train_timesteps)
    reference_samples = []
    for sample in samples:
        row = next((ref.row for ref in sample.references if ref.augmentation < 0), sample.row)
        reference_samples.append(Sample(sample.index, row, (), True, False, sample.seed + 1))
    reference_latents, reference_noise, _, _ = draw_targets(reference_samples, features, vae_config, num_train_timesteps)
    records = [cache.records[s.row] for s in samples]
    plain = [False] * len(samples)
    return InvAdapterBatch(
        latents=latents.to(device),
        noise=noise.to(device),
        timesteps=timesteps.to(device),
        reference_latents=reference_latents.to(device),
        reference_noise=reference_noise.to(device),
        reference_rows=[s.row for s in reference_samples],
        token_ids={k: v.to(device) for k, v in text.tokenize([r.caption for r in records], [""] * len(samples), plain).items()},
        null_token_ids={k: v.to(device) for k, v in text.tokenize([""] * len(samples), [""] * len(samples), plain).items()},
        time_ids=time_ids.to(device),
    )


@dataclass
class FrozenParts:
    """What the training step uses but does not train. A plain object, not a module: DDP and `parameters()` see
    the adapter alone."""

    base: BaseModel
    binding: DiffusersIDAdapter
    face_loss: nn.Module | None


class IDAdapterTrainingStep(nn.Module):
    """forward(batch) -> the step's losses; the only registered submodule is the adapter.

    Identity dropout (our choice, DESIGN.md §2.6 [I]): a dropped sample gets E_r = 0 and the plain caption (no
    ', <class> is <trigger>' suffix, so no E_c), the unconditional input of classifier-free guidance; it gets no
    face-ID loss (there is no identity to preserve)."""

    def __init__(self, adapter: IDAdapter, base: BaseModel, face_loss: nn.Module | None, face_id_weight: float) -> None:
        super().__init__()
        self.adapter = adapter
        self.frozen = FrozenParts(base, DiffusersIDAdapter(base.unet, adapter), face_loss)
        self.face_id_weight = face_id_weight

    def forward(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        base = self.frozen.base
        embeds = self.adapter.encode(batch.clip_patches, batch.face_embeds, batch.clip_image_embeds)
        keep = batch.keep_identity
        self.frozen.binding.set_identity(embeds.reference_tokens * keep[:, None, None].to(embeds.reference_tokens.dtype))
        context, pooled = base.text.encode(batch.token_ids, embeds.identity_tokens)
        denoised = base.denoise(batch.latents, batch.noise, batch.timesteps, context, pooled, batch.time_ids)
        diffusion = denoised.loss
        losses = {"diffusion_loss": diffusion, "loss": diffusion}
        if self.frozen.face_loss is not None and self.face_id_weight > 0:
            face, gate_open, face_samples = self._face_id_loss(denoised.noisy, denoised.prediction, batch)
            losses.update(loss=diffusion + self.face_id_weight * face, face_id_loss=face,
                          face_id_gate_open=gate_open, face_id_samples=face_samples)
        return losses

    def release(self) -> None:
        """Free E_r's per-block K/V once the step's backward has run."""
        self.frozen.binding.set_identity(None)

    def _face_id_loss(self, noisy: torch.Tensor, prediction: torch.Tensor, batch: TrainingBatch):
        """λ's term of DESIGN.md §2.5: 1 - cos(R(x̂0), mean f_a), on the samples that kept their identity and whose
        x̂0 shows a face."""
        from .losses import decode_latents, predict_x0

        base = self.frozen.base
        kept = batch.keep_identity.nonzero().squeeze(1)
        if len(kept) == 0:
            zero = prediction.sum() * 0.0  # in the graph, so every process runs the same backward
            return zero, zero.detach(), zero.detach()
        alphas = base.noise_scheduler.alphas_cumprod.to(noisy.device)[batch.timesteps[kept]]
        x0 = predict_x0(noisy[kept], prediction[kept], alphas, base.prediction_type)
        result = self.frozen.face_loss.from_latents(
            lambda latents: decode_latents(base.vae, latents), x0, batch.face_embeds[kept].float().mean(dim=1)
        )
        open_count = result.gate.float().sum().detach()
        return result.loss, open_count, torch.tensor(float(len(kept)), device=open_count.device)


def gate_values(adapter: IDAdapter) -> dict[str, float]:
    """tanh(γ) of every block's attention and dense gates (DESIGN.md §2.4: how much each adapter contributes)."""
    values = {}
    for index, block in enumerate(adapter.blocks):
        values[f"gates/attn/{index:02d}"] = float(torch.tanh(block.alpha_attn.detach().float()))
        values[f"gates/dense/{index:02d}"] = float(torch.tanh(block.alpha_dense.detach().float()))
    return values


def sample_grid(
    step_module: IDAdapterTrainingStep | InvAdapterTrainingStep, features: FrozenFeatures,
    references: tuple[ReferenceKey, ...], class_word: str, config: FitConfig, accelerator,
) -> np.ndarray:
    """(H, W, 3) uint8: the references, then one generation per sample prompt (train/generate.py: the diffusers
    pipeline with the binding attached; DDIM, `sample_steps` steps, seed `seed`, guidance over the identity as
    `identity_in_negative` says). IDAdapter: the N reference crops, the identity token spliced; Inv-Adapter: the
    identity's first image (`references[0]`) as the reference, taken at each step as it trains (`reference_features`)."""
    adapter, base, binding = step_module.adapter, step_module.frozen.base, step_module.frozen.binding
    prompts = list(config.sample_prompts)
    seeds = [config.seed] * len(prompts)
    settings = SamplingSettings(config.resolution, config.sample_steps, config.sample_guidance,
                                identity_in_negative=config.identity_in_negative)
    was_training = adapter.training
    adapter.eval()
    try:
        with accelerator.autocast():
            if isinstance(adapter, InvAdapter):
                image, latent = inv_adapter_reference(base, features.cache.records[references[0].row].image,
                                                      config.resolution)
                shown = [image]
                images = generate_inv_adapter_images(base, adapter, binding, latent.to(accelerator.device), prompts,
                                                     seeds, settings, config.reference_features, config.inversion_steps,
                                                     reference_seed=config.seed)
            else:
                shown = [features.clip_crop(ref).numpy() for ref in references]
                feats = {k: v.to(accelerator.device) for k, v in features.references([references]).items()}
                images = generate_identity_images(base, adapter, binding, feats, prompts, class_word, seeds, settings)
    finally:
        adapter.train(was_training)
    return image_grid([[*shown, *images]], config.resolution)


@contextmanager
def deterministic_algorithms(enabled: bool, warn_only: bool = False):
    """torch.use_deterministic_algorithms for the run, restored afterwards. `warn_only` on CUDA: the face-ID loss's
    face crop (`grid_sample`) has no deterministic CUDA backward (pytorch/pytorch#68959), which would otherwise stop
    the run at the first face the gate lets through; torch then warns and that gradient may differ in its last bits."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@dataclass
class TrainResult:
    step: int
    """Optimizer steps done."""
    adapter: IDAdapter
    losses: list[dict[str, float]] = field(default_factory=list)
    """This process's losses of each optimizer step of this run (mean over its micro-steps)."""
    checkpoint: Path | None = None
    """The last checkpoint written by this run."""
    features_computed: int = 0
    """Frozen features computed (not found cached) by this process: what a benchmark of `cache_features` reads."""
    weights_sha256: str = ""
    """`weights_digest` of the adapter at the end."""


class _Meter:
    """Sums of the logged quantities between two log steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.micro_steps = 0

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.micro_steps += 1

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over the micro-steps since the last call and over all processes (every process must call this)."""
        names = sorted(self.sums)
        totals = accelerator.reduce(torch.tensor([self.sums[n] for n in names], dtype=torch.float64,
                                                 device=accelerator.device), "sum")
        totals = dict(zip(names, totals.tolist()))
        count = self.micro_steps * accelerator.num_processes
        out = {f"train/{n}": totals[n] / count for n in ("loss", "diffusion_loss", "face_id_loss") if n in totals}
        if totals.get("face_id_samples"):
            out["train/face_id_gate_rate"] = totals["face_id_gate_open"] / totals["face_id_samples"]
        self.sums.clear()
        self.micro_steps = 0
        return out


def _tracker_config(config: FitConfig) -> dict:
    """TensorBoard's hparams take scalars and strings only."""
    return {k: (", ".join(v) if isinstance(v, list) else "" if v is None else v) for k, v in config.to_dict().items()}


def train(config: FitConfig, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training as `config` says. `stop_after` ends the run after that many optimizer steps as if it
    had been killed there (no extra checkpoint): what resumption is tested with."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.log_with == "none" else config.log_with, cpu=config.cpu,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # identity dropout can leave the identity MLP without gradient in a micro-batch
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(config.seed)
    with deterministic_algorithms(config.deterministic, warn_only=accelerator.device.type == "cuda"):
        return _train(config, accelerator, stop_after)


def feature_cache_folder(config: FitConfig, weight_dtype: torch.dtype | None) -> Path | None:
    """A subfolder of `feature_cache_dir` per (base model, CLIP vision, resolution, dtype): features made with other
    models are never read back."""
    if config.feature_cache_dir is None:
        return None
    models = [config.pretrained or config.single_file, config.clip_vision, config.resolution, str(weight_dtype)]
    key = hashlib.sha256(json.dumps([str(Path(m).resolve()) if isinstance(m, str) else m for m in models]).encode())
    return Path(config.feature_cache_dir) / key.hexdigest()[:16]


def build_training_step(config: FitConfig, cache: TrainCache, device: torch.device,
                        weight_dtype: torch.dtype | None = None) -> tuple[nn.Module, ClipVision | None]:
    """Load the frozen models onto `device` and build a fresh adapter (seeded by the global RNG) and its step, for
    the method `config.method` (Inv-Adapter needs no CLIP vision: the second value is then None)."""
    if config.method == "inv-adapter":
        return build_inv_adapter_step(config, device, weight_dtype), None
    face_model = cache.settings["face_model"]
    if config.face_model and config.face_model != face_model:
        raise ConfigError(f"--face-model {config.face_model}, but the cache was prepared with '{face_model}'; the "
                          "face-ID loss must use the recognizer of the cached reference embeddings")
    base = load_base_model(config)
    clip = load_clip_vision(config.clip_vision, config.clip_vision_name)
    adapter = IDAdapter(idadapter_config(config, base.layout, clip, cache.face_embed_dim, face_model))
    # the UNet and text encoders in the autocast dtype (as IP-Adapter's tutorial_train.py does)
    for module in (base.unet, *base.text.modules()):
        module.to(device) if weight_dtype is None else module.to(device, weight_dtype)
    # the VAE and CLIP vision stay float32: the VAE for exact target latents and the face-ID loss's decode, CLIP vision
    # because ComfyUI computes its features in float32 (hosts/transformers_clip.py); both run once per image (cached)
    clip.model.to(device, torch.float32)
    base.vae.to(device)
    face_loss = None
    if config.face_id_weight > 0:
        face_loss = build_face_id_loss(config, face_model, cache.face_embed_dim).to(device)
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        base.vae.enable_gradient_checkpointing()
    return IDAdapterTrainingStep(adapter, base, face_loss, config.face_id_weight), clip


def build_inv_adapter_step(config: FitConfig, device: torch.device, weight_dtype: torch.dtype | None) -> InvAdapterTrainingStep:
    """The EAA on the base model. Its self-attention K/V projections start as copies of each block's own (our choice,
    docs/DESIGN.md §3.3: the reference tokens start in the block's key/value space; the closed gate still leaves the
    UNet unchanged at step 0)."""
    base = load_base_model(config)
    adapter = InvAdapter(InvAdapterConfig(base.layout))
    with torch.no_grad():
        for block, eaa in zip(transformer_blocks_in_forward_order(base.unet), adapter.blocks):
            eaa.self_k.weight.copy_(block.attn1.to_k.weight)
            eaa.self_v.weight.copy_(block.attn1.to_v.weight)
    for module in (base.unet, *base.text.modules()):
        module.to(device) if weight_dtype is None else module.to(device, weight_dtype)
    base.vae.to(device)
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    return InvAdapterTrainingStep(adapter, base, config.reference_features, config.inversion_steps,
                                  trajectory_folder(config))


def trajectory_folder(config: FitConfig) -> Path:
    """Where a run keeps its references' DDIM inversions (`reference_features = inversion`): under its output folder,
    named after what they depend on (base model, cache, inversion steps, resolution), so a resumed run reuses them and
    a run on another base or cache makes its own."""
    inputs = [config.pretrained, config.single_file, str(Path(config.cache).resolve()), config.inversion_steps,
              config.resolution]
    return Path(config.output_dir) / "inversions" / hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:12]


def _resume(config: FitConfig, accelerator, adapter: nn.Module, optimizer, lr_scheduler) -> int:
    """The step to start at: 0, or the step of the checkpoint `config.resume` names, restored."""
    checkpoint = find_checkpoint(config.output_dir, config.resume) if config.resume else None
    if checkpoint is None:
        if config.resume:
            log.info("no checkpoint in %s yet; starting at step 0", config.output_dir)
        return 0
    state = load_checkpoint(accelerator, checkpoint, adapter, optimizer, lr_scheduler)
    changed = [k for k in _RESUME_SENSITIVE if state.settings.get(k) != getattr(config, k)]
    if changed:
        log.warning("resuming %s with changed settings (%s): the run will not equal an uninterrupted one",
                    checkpoint, ", ".join(changed))
    log.info("resumed from %s at step %d", checkpoint, state.step)
    return state.step


class TrainingSession:
    """A training run's state and its inner step: the step module (frozen models + the adapter, for
    `config.method`), Adam over the adapter, the learning-rate schedule, the sample plan and the frozen-feature store.
    `fit` drives it under accelerate (device, mixed precision, data-parallel processes, gradient accumulation); the
    benchmarks drive it directly, on one CPU process without accelerate (then without gradient accumulation).
    `adjust` changes the step module before the optimizer is made (the benchmarks' ablations, train/ablations.py)."""

    def __init__(self, config: FitConfig, accelerator=None,
                 adjust: Callable[[nn.Module], None] | None = None) -> None:
        from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        if accelerator is None and config.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps > 1 needs accelerate: run `python -m train fit`")
        torch.manual_seed(config.seed)  # the adapter's initialisation (fit has also seeded the other generators)
        self.config, self.accelerator = config, accelerator
        self.device = torch.device("cpu") if accelerator is None else accelerator.device
        self.weight_dtype = None if accelerator is None else {
            "fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
        self.cache = TrainCache(config.cache)
        self.step_module, self.clip = build_training_step(config, self.cache, self.device, self.weight_dtype)
        if adjust is not None:
            adjust(self.step_module)
        self.optimizer = torch.optim.Adam(self.step_module.adapter.parameters(), lr=config.lr)
        self.lr_scheduler = (
            get_cosine_schedule_with_warmup(self.optimizer, config.warmup_steps, config.max_steps)
            if config.lr_schedule == "cosine"
            else get_constant_schedule_with_warmup(self.optimizer, config.warmup_steps))
        self.model = self.step_module
        if accelerator is not None:
            self.model, self.optimizer = accelerator.prepare(self.step_module, self.optimizer)
        self.plan = SamplePlan(self.cache, config.seed, config.num_refs, config.identity_dropout, config.random_flip)
        self.features = self.frozen_features(self.cache, config.cache_features,
                                             feature_cache_folder(config, self.weight_dtype))
        self.assemble = assemble_inv_adapter_batch if config.method == "inv-adapter" else assemble_batch
        """The method's batch assembly."""
        self.model.train()

    def frozen_features(self, cache: TrainCache, enabled: bool = True, directory: Path | None = None) -> FrozenFeatures:
        """The frozen-feature store over `cache` (the session's own, or an evaluation cache), with the session's VAE
        and CLIP vision model."""
        clip = None if self.clip is None else clip_encoder_from_transformers(self.clip.model)
        return FrozenFeatures(cache, self.step_module.frozen.base.vae, clip, self.config.resolution, self.device,
                              enabled=enabled, directory=directory, deterministic=self.config.deterministic)

    def batch(self, samples: list[Sample], features: FrozenFeatures | None = None):
        """The step's tensors of `samples` (the method's batch assembly), with the session's features or `features`."""
        base = self.step_module.frozen.base
        features = self.features if features is None else features
        return self.assemble(samples, features, features.cache, base.text, base.vae.config,
                             base.noise_scheduler.config.num_train_timesteps, self.device)

    def step(self, step: int, features: FrozenFeatures | None = None, meter: _Meter | None = None
             ) -> dict[str, float]:
        """Optimizer step `step` (0-based): per micro-step the plan's samples of this process, the method's batch, the
        step module's losses, backward and Adam (under accelerate: `accumulate` and its `backward`); then the
        learning-rate schedule. Returns the losses, the mean over the micro-steps; `meter` gets each micro-step's."""
        config, accelerator = self.config, self.accelerator
        accumulation = config.gradient_accumulation_steps
        process, processes = (0, 1) if accelerator is None else (accelerator.process_index,
                                                                 accelerator.num_processes)
        step_losses: dict[str, float] = {}
        for micro in range(accumulation):
            samples = self.plan.step_samples(step * accumulation + micro, config.batch_size, process, processes)
            batch = self.batch(samples, features)
            with nullcontext() if accelerator is None else accelerator.accumulate(self.model):
                losses = self.model(batch)
                losses["loss"].backward() if accelerator is None else accelerator.backward(losses["loss"])
                self.optimizer.step()
                self.optimizer.zero_grad()
            self.step_module.release()
            values = {name: float(value.detach()) for name, value in losses.items()}
            if meter is not None:
                meter.add(values)
            for name, value in values.items():
                step_losses[name] = step_losses.get(name, 0.0) + value / accumulation
        self.lr_scheduler.step()
        return step_losses

    def run(self, steps: int, desc: str = "train") -> list[dict[str, float]]:
        """Optimizer steps 0 .. steps - 1 (a fresh session: no checkpoints, no logging); the losses of each."""
        return [self.step(step) for step in tqdm(range(steps), desc=desc, leave=False)]


def _train(config: FitConfig, accelerator, stop_after: int | None) -> TrainResult:
    output_dir = Path(config.output_dir)
    session = TrainingSession(config, accelerator)
    adapter = session.step_module.adapter
    log.info("trainable parameters: %s (%s)", f"{sum(p.numel() for p in adapter.parameters()):,}",
             adapter.config.layout.describe())
    start_step = _resume(config, accelerator, adapter, session.optimizer, session.lr_scheduler)
    if accelerator.is_main_process:
        save_config(config, output_dir / RESOLVED_CONFIG_FILE)
    if config.log_with != "none":
        accelerator.init_trackers("idadapter", config=_tracker_config(config))

    plan, features = session.plan, session.features
    sample_references = None
    if config.sample_every:
        identity = config.sample_identity or next(iter(plan.rows_of_identity))
        sample_references = plan.identity_references(identity)
        sample_class_word = session.cache.records[plan.rows_of_identity[identity][0]].class_word
    result = TrainResult(step=start_step, adapter=adapter)
    meter = _Meter()
    progress = tqdm(total=config.max_steps, initial=start_step, desc="fit", disable=not accelerator.is_local_main_process)
    for step in range(start_step, config.max_steps):
        step_losses = session.step(step, meter=meter)
        done = step + 1
        result.step = done
        result.losses.append(step_losses)
        result.features_computed = features.computed
        progress.update(1)
        progress.set_postfix(loss=f"{step_losses['loss']:.4f}")
        if done % config.log_every == 0 or done == config.max_steps:
            values = meter.reduce(accelerator)
            values["train/lr"] = session.lr_scheduler.get_last_lr()[0]
            values.update(eaa_gate_values(adapter) if isinstance(adapter, InvAdapter) else gate_values(adapter))
            accelerator.log(values, step=done)
        if done % config.checkpoint_every == 0 or done == config.max_steps:
            result.checkpoint = save_checkpoint(accelerator, output_dir, done, adapter, session.optimizer,
                                                session.lr_scheduler, config.to_dict(), config.keep_checkpoints)
        if sample_references is not None and done % config.sample_every == 0:
            if accelerator.is_main_process:
                _log_samples(sample_grid(session.step_module, features, sample_references, sample_class_word, config,
                                         accelerator), done, config, accelerator)
            accelerator.wait_for_everyone()
        if stop_after is not None and done >= stop_after:
            break
    progress.close()
    accelerator.end_training()
    result.weights_sha256 = weights_digest(adapter)
    # every process says what it holds: data-parallel processes must agree (a desync shows here)
    log.info("process %d of %d: adapter weights sha256 %s", accelerator.process_index, accelerator.num_processes,
             result.weights_sha256)
    return result


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _log_samples(grid: np.ndarray, step: int, config: FitConfig, accelerator) -> None:
    from PIL import Image

    path = Path(config.output_dir) / "samples" / f"step-{step:08d}.png"
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    if config.log_with == "tensorboard":
        accelerator.get_tracker("tensorboard").log_images({"samples": grid[None]}, step=step, dataformats="NHWC")
    log.info("sample grid: %s", path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> TrainResult:
    config = config_from_args(args)
    result = train(config)
    log.info("trained to step %d; last checkpoint %s", result.step, result.checkpoint)
    return result
