"""Memory of each part of a real-size training step, measured in a process of its own (bench/real_scale.py, step
2): frozen models and trainable parameters, Adam's state, and the peak above the loaded models during one training
step's forward and backward and the face-ID loss's decode with gradients."""
from __future__ import annotations

import logging
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import GIB, NUM_REFS
from bench.real_scale_meta import meta_step
from bench.real_scale_run import Settings, rss_bytes
from train.insightface_archs import IResNet
from train.real_size_models import (
    ModelFolders, on_device, random_idadapter_batch, random_inv_adapter_batch, recognizer_layout,
)

log = logging.getLogger("real_scale")


class PeakMemory:
    """The most memory this process held while the block ran, above what it held when the block started: on the CPU
    its RSS (sampled every 5 ms; glibc's mmap threshold is fixed low by the caller so that freed tensors return to the
    system), on a GPU torch's CUDA allocator statistics."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "PeakMemory":
        import ctypes

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            self.started = time.perf_counter()
            return self
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start = rss_bytes(os.getpid())
        self.peak = self.start
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss_bytes(os.getpid()))
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.started
            self.peak = torch.cuda.max_memory_allocated()
            return
        self.seconds = time.perf_counter() - self.started
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(os.getpid()))

    @property
    def above_start_gib(self) -> float:
        return (self.peak - self.start) / GIB


def tensor_gib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / GIB


def measure_parts(settings: Settings, folders: ModelFolders, method: str, out: Path) -> dict:
    """Runs inside its own process (`--parts`). Loads the base model as the trainer does, builds the method's step
    module without the face-ID loss, and measures each part (module docstring, 2.)."""
    from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig
    from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from train.config import resolve_config
    from train.fit import IDAdapterTrainingStep
    from train.inv_adapter_step import InvAdapterTrainingStep
    from train.losses import decode_latents
    from train.models import load_base_model

    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    weight_dtype = torch.bfloat16 if settings.mixed_precision == "bf16" else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=weight_dtype is not None)
    config = resolve_config(None, dict(cache="unused", output_dir="unused", pretrained=str(folders.base),
                                       clip_vision=str(folders.clip_vision), face_id_weight=0.0, method=method))
    base = load_base_model(config)
    clip_config = CLIPVisionConfig.from_pretrained(folders.clip_vision)
    recognizer = recognizer_layout(settings.quick)
    face_dim = recognizer.embed_dim
    with torch.device("meta"):
        clip_params = list(CLIPVisionModelWithProjection(clip_config).parameters())
        recognizer_params = list(IResNet(recognizer.stages, recognizer.widths, face_dim).parameters())
    patches = (clip_config.image_size // clip_config.patch_size) ** 2
    torch.manual_seed(0)
    if method == "idadapter":
        adapter = IDAdapter(IDAdapterConfig(
            layout=base.layout, num_refs=NUM_REFS, clip_embed_dim=clip_config.projection_dim,
            mff=MFFConfig(clip_dim=clip_config.hidden_size, face_dim=face_dim, num_patches=patches)))
        step = IDAdapterTrainingStep(adapter, base, None, 0.0)

        def make_batch(batch: int, resolution: int):
            return random_idadapter_batch(base, batch, resolution, NUM_REFS, face_dim, clip_config.hidden_size,
                                          patches, clip_config.projection_dim)
    else:
        adapter = InvAdapter(InvAdapterConfig(base.layout))
        step = InvAdapterTrainingStep(adapter, base, "noised", 1)

        def make_batch(batch: int, resolution: int):
            return random_inv_adapter_batch(base, batch, resolution)

    step.train()
    trainable = list(adapter.parameters())
    parts = dict(
        device=settings.device, activation_dtype="bf16" if weight_dtype is not None else "fp32",
        frozen_gib_fp32=dict(
            unet=tensor_gib(base.unet.parameters()), text_encoders=tensor_gib(p for m in base.text.modules()
                                                                            for p in m.parameters()),
            vae=tensor_gib(base.vae.parameters()),
            clip_vision=tensor_gib(clip_params) if method == "idadapter" else 0.0,
            face_recognizer=tensor_gib(recognizer_params) if method == "idadapter" else 0.0),
        trainable_params=sum(p.numel() for p in trainable), trainable_gib=tensor_gib(trainable),
        steps=[], decode=[])
    for module in (base.unet, *base.text.modules()):  # as train.fit.build_training_step places them
        module.to(device) if weight_dtype is None else module.to(device, weight_dtype)
    base.vae.to(device)
    adapter.to(device)

    def save() -> None:
        out.write_text(json.dumps(parts, indent=2))

    def training_step(batch: int, checkpointing: bool, resolution: int) -> None:
        entry = dict(batch=batch, gradient_checkpointing=checkpointing, resolution=resolution)
        parts["steps"].append(entry)
        if not checkpointing and not settings.quick:  # the activations all stay: skip what cannot fit the cap
            counted = meta_step(settings.base, resolution, batch, torch.float32, method)["saved_gib"]
            expected = rss_bytes(os.getpid()) / GIB + 1.2 * counted + parts["trainable_gib"]
            if expected > settings.memory_cap_gib:
                entry["skipped"] = f"skipped: would need about {expected:.1f} GiB of RAM (cap {settings.memory_cap_gib:g})"
                save()
                return
        base.unet.enable_gradient_checkpointing() if checkpointing else base.unet.disable_gradient_checkpointing()
        adapter.zero_grad(set_to_none=True)
        inputs = on_device(make_batch(batch, resolution), device)
        with PeakMemory(device) as peak:
            with autocast:
                losses = step(inputs)
            losses["loss"].backward()
        step.release()
        entry.update(peak_above_models_gib=peak.above_start_gib, seconds=peak.seconds,
                     loss=float(losses["loss"].detach()),
                     gradients_gib=tensor_gib(p.grad for p in trainable if p.grad is not None))
        del losses
        save()
        log.info("step b%d gc=%s %d px: +%.2f GiB, %.0f s", batch, checkpointing, resolution,
                 peak.above_start_gib, peak.seconds)

    def face_id_decode(batch: int, checkpointing: bool, resolution: int) -> None:
        base.vae.enable_gradient_checkpointing() if checkpointing else base.vae.disable_gradient_checkpointing()
        latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device, requires_grad=True)
        with PeakMemory(device) as peak:
            with autocast:
                decode_latents(base.vae, latents).mean().backward()
        parts["decode"].append(dict(batch=batch, gradient_checkpointing=checkpointing, resolution=resolution,
                                    peak_above_models_gib=peak.above_start_gib, seconds=peak.seconds))
        save()
        log.info("decode b%d gc=%s: +%.2f GiB, %.0f s", batch, checkpointing, peak.above_start_gib, peak.seconds)

    # smallest first: a run the cap kills leaves what was measured before it. The first step of a process allocates
    # for good what later ones reuse (measured: +4.8 GiB at batch 1, then +1.9 GiB at batch 2): a warm-up, not kept
    low = settings.parts_resolution
    training_step(1, True, low)
    parts["steps"].clear()
    for checkpointing in (True, False):
        for batch in settings.measure_batches:
            training_step(batch, checkpointing, low)
    parts["optimizer"] = optimizer_state(trainable)
    adapter.zero_grad(set_to_none=True)
    save()
    if method == "idadapter":
        for checkpointing in (True, False):
            for batch in settings.measure_batches:
                face_id_decode(batch, checkpointing, low)
    training_step(1, True, settings.resolution)
    return parts


def optimizer_state(trainable: list[torch.nn.Parameter]) -> dict:
    """Bytes of Adam's state after one step (gradients of ones), and of bitsandbytes' Adam8bit when it imports."""
    out = {}
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizers: dict[str, Callable[[], torch.optim.Optimizer]] = {"adam": lambda: torch.optim.Adam(trainable, lr=1e-6)}
    try:
        import bitsandbytes

        optimizers["adam8bit"] = lambda: bitsandbytes.optim.Adam8bit(trainable, lr=1e-6)
        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception as err:  # a missing or broken install: report it, measure Adam alone
        out["bitsandbytes"] = f"not importable ({type(err).__name__})"
    snapshot = [p.detach().clone() for p in trainable]
    for name, make in optimizers.items():
        optimizer = make()
        optimizer.step()
        out[f"{name}_state_gib"] = tensor_gib(v for state in optimizer.state.values() for v in state.values()
                                              if torch.is_tensor(v))
        del optimizer
        with torch.no_grad():
            for p, original in zip(trainable, snapshot):
                p.copy_(original)
    return out
