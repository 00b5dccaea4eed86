"""Pre-training a tiny base model (train/tiny_models.py) on a synthetic world, so that the benchmarks train adapters
on a base that draws that world in general and knows no identity: the VAE as a plain autoencoder where generation
needs a decoder that inverts the encoder (train/miniature.py), then its scaling factor calibrated and the UNet
trained on the images with their captions (ε-MSE, Adam); a CLIP vision model trained contrastively against the
base's text encoder (`train_clip_vision`); and a face recognizer trained with ArcFace's margin loss
(`train_recognizer`). Seeded: the same inputs give the same weights."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .tiny_models import BaseComponents


def train_autoencoder(vae: torch.nn.Module, pixels: torch.Tensor, steps: int, batch_size: int, lr: float,
                      seed: int) -> float:
    """The VAE as a plain autoencoder (reconstruction MSE through the posterior mean; the posterior stays
    near-deterministic), Adam with cosine decay. Returns the mean loss of the last 20 steps."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    vae.train()
    losses = []
    for _ in tqdm(range(steps), desc="autoencoder", leave=False):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        loss = F.mse_loss(vae.decode(vae.encode(batch).latent_dist.mean).sample, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        losses.append(float(loss.detach()))
    vae.eval()
    return float(np.mean(losses[-20:]))


def train_unet(parts: BaseComponents, pixels: torch.Tensor, captions: list[str], steps: int, batch_size: int,
               lr: float, seed: int, cosine_decay: bool = True, ema_decay: float | None = None,
               train_text_encoder: bool = False) -> list[float]:
    """Calibrate the VAE's scaling factor (1 / std of the latents, as SD's 0.18215 was chosen), then train the whole
    UNet on `pixels` (B, 3, H, W) in [-1, 1] with their `captions` (ε-MSE, Adam, with or without cosine decay of the
    learning rate); with `train_text_encoder`, the text encoder trains with it (as latent diffusion trained its text
    transformer from scratch); with `ema_decay`, what trains keeps the exponential moving average of its training
    weights (diffusers' EMAModel, with its warm-up). Returns the loss of every step."""
    from diffusers.training_utils import EMAModel

    with torch.no_grad():
        latents = torch.cat([parts.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
        scale = float(1.0 / latents.std())
        parts.vae.register_to_config(scaling_factor=scale)
        latents = latents * scale
    unique = sorted(set(captions))
    tokens = parts.tokenizer(unique, padding="max_length", max_length=parts.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    caption_index = torch.tensor([unique.index(c) for c in captions])
    trained = [*parts.unet.parameters(), *(parts.text_encoder.parameters() if train_text_encoder else [])]
    frozen_context = None
    if not train_text_encoder:
        with torch.no_grad():
            frozen_context = parts.text_encoder(tokens).last_hidden_state
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(trained, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine_decay else None
    average = None if ema_decay is None else EMAModel(trained, decay=ema_decay)
    parts.unet.train()
    parts.text_encoder.train(train_text_encoder)
    losses = []
    for _ in tqdm(range(steps), desc="base UNet", leave=False):
        chosen = torch.randint(0, len(latents), (batch_size,), generator=generator)
        noise = torch.randn(latents[chosen].shape, generator=generator)
        timesteps = torch.randint(0, parts.scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = parts.scheduler.add_noise(latents[chosen], noise, timesteps)
        if train_text_encoder:
            context = parts.text_encoder(tokens[caption_index[chosen]]).last_hidden_state
        else:
            context = frozen_context[caption_index[chosen]]
        loss = F.mse_loss(parts.unet(noisy, timesteps, encoder_hidden_states=context).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if schedule is not None:
            schedule.step()
        if average is not None:
            average.step(trained)
        losses.append(float(loss.detach()))
    if average is not None:
        average.copy_to(trained)
    parts.unet.eval()
    parts.text_encoder.eval()
    return losses


def train_clip_vision(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, caption_embeds: torch.Tensor,
                      steps: int, batch_size: int, lr: float, seed: int) -> float:
    """CLIP's contrastive objective with the text side locked: a transformers CLIPVisionModelWithProjection learns
    to pick each image's caption among all `caption_embeds` (C, D), the text encoder's pooled output of the C
    captions. `pixels` (B, 3, S, S) are preprocessed as the CLIP encoder sees them and `labels` (B,) index their
    captions. The vision tower with its projection, a text projection and the temperature train
    (`_train_one_cycle`). Returns the mean loss of the last 20 steps."""
    text_projection = torch.nn.Linear(caption_embeds.shape[1], model.config.projection_dim, bias=False)
    log_temperature = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def loss_of(chosen: torch.Tensor) -> torch.Tensor:
        images = F.normalize(model(pixel_values=pixels[chosen]).image_embeds, dim=-1)
        captions = F.normalize(text_projection(caption_embeds), dim=-1)
        return F.cross_entropy(log_temperature.exp().clamp(max=100) * images @ captions.T, labels[chosen])

    return _train_one_cycle(model, [*text_projection.parameters(), log_temperature], loss_of, len(pixels), steps,
                            batch_size, lr, seed, "CLIP vision")


def train_recognizer(model: torch.nn.Module, crops: torch.Tensor, labels: torch.Tensor, classes: int, steps: int,
                     batch_size: int, lr: float, seed: int, margin: float, scale: float) -> float:
    """ArcFace's objective (additive angular margin): `model` maps aligned crops (B, 3, S, S), preprocessed as
    insightface feeds its recognizer, to embeddings whose direction names the person; a class centre per label
    (`classes` of them) trains with it, and the target class's logit is scale·cos(θ + margin), the others'
    scale·cos θ (`_train_one_cycle`). Returns the mean loss of the last 20 steps."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.Parameter(torch.randn(classes, model(crops[:1]).shape[-1], generator=generator))

    def loss_of(chosen: torch.Tensor) -> torch.Tensor:
        cosines = F.normalize(model(crops[chosen]), dim=-1) @ F.normalize(centres, dim=-1).T
        angles = torch.acos(cosines.clamp(-1 + 1e-6, 1 - 1e-6))
        target = F.one_hot(labels[chosen], classes).bool()
        return F.cross_entropy(scale * torch.where(target, torch.cos(angles + margin), cosines), labels[chosen])

    return _train_one_cycle(model, [centres], loss_of, len(crops), steps, batch_size, lr, seed, "recognizer",
                            generator)


def _train_one_cycle(model: torch.nn.Module, extra: list[torch.nn.Parameter],
                     loss_of: Callable[[torch.Tensor], torch.Tensor], count: int, steps: int,
                     batch_size: int, lr: float, seed: int, desc: str,
                     generator: torch.Generator | None = None) -> float:
    """`steps` of AdamW (weight decay 0.01, one-cycle rate) on `model` and the `extra` parameters, each on the loss
    `loss_of` gives for a random batch of indices into `count` examples (drawn from `generator`, else one seeded
    with `seed`). Returns the mean loss of the last 20 steps; the model is left in eval mode."""
    optimizer = torch.optim.AdamW([*model.parameters(), *extra], lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    generator = generator or torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        loss = loss_of(torch.randint(0, count, (batch_size,), generator=generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return float(np.mean(losses[-20:]))
