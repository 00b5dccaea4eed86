"""Does the trainer learn identity? The paper's Table 2 ablation (DESIGN.md §2.8) in miniature, on CPU, and the same
check for Inv-Adapter and for IDAdapter's faster mode.

Data (synthetic, written in the prepared-cache format of train/cache.py, so `fit`'s own data code reads it):
every identity is a striped disc ("face") with its own two colours, stripe angle and stripe offset, and its own
ArcFace embedding. A target image shows the disc near the centre at about the same size (as in an aligned face data
set such as CelebA-HQ) on a random grey background; the 224 px CLIP crops show the disc centred and large, as aligned
face crops do; angle, offset and brightness are jittered per image; the ArcFace embeddings are the identity's unit
vector plus noise (cosine about 0.8 within an identity, about 0 across). Every caption is the same ("a photo of a
person"), so the references are the only carrier of identity.

Models (random weights, built in code): a tiny SD-like base model (UNet, VAE with a near-deterministic posterior
and a data-calibrated scaling factor, CLIP text encoder) whose UNet is first trained on the training images
with the plain caption (a "base model" that denoises these faces in general and knows no identity), and a tiny CLIP
vision model. Then the adapter is trained with the trainer's step (`IDAdapterTrainingStep`, `SamplePlan`,
`FrozenFeatures`, `assemble_batch`: the inner loop of train.fit without accelerate) in four settings, each from the
same initialisation and sample order:
- full: MFF -> E_r into the adapters, and E_c as the identity token;
- identity token only (the paper's "No MFF (no E_r)"): every adapter gate kept closed (tanh(0) = 0, frozen);
- adapter only (the paper's "No Text Embedding (no E_c)"): the trigger word keeps its own embedding;
- skip highest resolution: the faster mode (Apply IDAdapter's `blocks`), the adapters of the highest-resolution
  blocks closed at training and at inference; the full model is also evaluated with them closed at inference only.
Inv-Adapter (`--method inv-adapter`; train/inv_adapter_step.py, one reference image per sample, no identity dropout)
is trained from the same base model in four settings: forward-noised references (the trainer's default) with both EAA
branches, with the self-attention branch only (W''_V frozen at 0) and the cross-attention branch only (the gate frozen
at 0), and DDIM-inverted references (`reference_features: inversion`) with both branches.

Check: diffusion loss on held-out target images of the TRAINING identities (images never used as targets or references
in training; with 8 identities the mapping from references to appearance is learned for those, not for identities
never seen), with fixed noise and a fixed grid of timesteps, conditioned on N references of the matching identity vs N
references of another training identity (shuffled; Inv-Adapter's reference is the first of them); gap = shuffled -
matching, which must be positive when identity is learned. Also shown: the loss without identity (E_r zeroed, plain
caption: the classifier-free-guidance input; for Inv-Adapter the EAA off, which is the base model), and the base
model alone. The faster mode's identity cost is the ratio of its gap to the full model's, per seed. Over several seeds
(each seed draws new identities, images, models and data order); mean and spread (sample standard deviation, and
min..max).

Run: `python bench/identity_learning.py [--method idadapter|inv-adapter|both] [--variants NAME ...] [--quick]
[--seeds 3] [--first-seed 0] [--steps 300] [--json PATH]` (on a 2-core machine shared with other jobs, 2026-12-06:
about 30 minutes a seed for IDAdapter's four settings at 300 steps, and as long for Inv-Adapter's four; `--quick`
halves the adapter training). Seeds are independent, so they can run as separate processes (`--first-seed k
--seeds 1`); `--json` is rewritten after every seed.
Prints a table and exits 0 (it is a report).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from idadapter_core.face import CLIP_CROP_SIZE  # noqa: E402
from train.cache import (  # noqa: E402
    CACHE_FORMAT, CACHE_VERSION, INDEX_FILE, REPORT_FILE, SETTINGS_FILE, SHARD_PATTERN, CacheRecord, TrainCache,
)
from train.config import FitConfig, resolve_config  # noqa: E402
from train.data import FrozenFeatures, ReferenceKey, Sample, SamplePlan  # noqa: E402
from idadapter_core.schedule import adapter_blocks  # noqa: E402
from train.fit import (  # noqa: E402
    IDAdapterTrainingStep, assemble_batch, assemble_inv_adapter_batch, build_training_step,
)
from train.inv_adapter_step import InvAdapterTrainingStep  # noqa: E402
from train.models import ClipVision, TextConditioning  # noqa: E402
from train.prepare import PrepareReport, save_arrays, write_text_atomic  # noqa: E402
from train.tiny_models import tiny_clip_tokenizer  # noqa: E402

log = logging.getLogger("identity_learning")

CAPTION = "a photo of a person"
CLASS_WORD = "person"
FACE_MODEL = "synthetic"
"""The face model name recorded in the synthetic cache (no recognizer runs: the embeddings are made up)."""


# ---- tiny models, written as local folders (the trainer loads models from folders only) ----------------------------

@dataclass(frozen=True)
class ModelSpec:
    """Constructor arguments of the base model's parts and of the CLIP vision model."""

    unet: dict
    """diffusers UNet2DConditionModel kwargs (cross_attention_dim is set to the text width)."""
    vae: dict
    """diffusers AutoencoderKL kwargs."""
    text: dict
    """transformers CLIPTextConfig kwargs (vocabulary and token count are set here)."""
    clip_vision: dict
    """transformers CLIPVisionConfig kwargs."""
    resolution: int
    """Target images are resolution x resolution pixels."""
    text_tokens: int
    """The tokenizer's and text encoder's sequence length."""


TINY_SPEC = ModelSpec(
    unet=dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
              up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=4, norm_num_groups=8),
    vae=dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8, layers_per_block=1),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    clip_vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, projection_dim=32),
    resolution=32,
    text_tokens=16,
)
"""32 px targets (8x8 latents), a two-level UNet, 16 CLIP patches of width 32."""


@dataclass
class BaseComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object


def build_base_components(spec: ModelSpec, seed: int) -> BaseComponents:
    """Random-weight SD1.x-style parts. The VAE's posterior is made near-deterministic (log-variance -20, as a
    trained VAE's is small), so a target's latent is its image's encoding, not noise."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(max_length=spec.text_tokens)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=spec.text_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec.text,
    ))
    vae = AutoencoderKL(sample_size=spec.resolution, **spec.vae)
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:] = 0.0
        vae.quant_conv.bias[latent:] = -20.0
    unet = UNet2DConditionModel(sample_size=spec.resolution // vae_downsampling(spec),
                                cross_attention_dim=spec.text["hidden_size"], **spec.unet)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)  # SD1.x's
    return BaseComponents(tokenizer, text_encoder.eval(), vae.eval(), unet, scheduler)


def vae_downsampling(spec: ModelSpec) -> int:
    return 2 ** (len(spec.vae["block_out_channels"]) - 1)


def save_base_model(parts: BaseComponents, folder: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def write_clip_vision(spec: ModelSpec, folder: Path, seed: int) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**spec.clip_vision)).save_pretrained(folder)
    return folder


# ---- synthetic identities --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticIdentity:
    name: str
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    angle: float
    """Stripe direction (radians)."""
    phase: float
    """Stripe offset (fraction of a period)."""
    embedding: np.ndarray
    """Unit vector: the identity's ArcFace embedding before per-image noise."""


def make_identities(count: int, face_dim: int, rng: np.random.Generator) -> list[SyntheticIdentity]:
    """Identities with hues spread around the colour wheel (a random offset), a second colour of another hue, and a
    random stripe angle: every identity looks different from every other."""
    import colorsys

    offset = rng.random()
    identities = []
    for index in range(count):
        hue = (offset + index / count) % 1.0
        second = (hue + 0.25 + 0.5 * rng.random()) % 1.0
        colours = tuple(tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)) for h in (hue, second))
        embedding = rng.standard_normal(face_dim)
        angle, phase = float(rng.uniform(0, math.pi)), float(rng.random())
        identities.append(SyntheticIdentity(f"id{index:02d}", colours, angle, phase,
                                            (embedding / np.linalg.norm(embedding)).astype(np.float32)))
    return identities


def render_face(identity: SyntheticIdentity, size: int, centre: tuple[float, float], radius: float,
                background: np.ndarray, rng: np.random.Generator, stripes: float = 3.0) -> np.ndarray:
    """(size, size, 3) uint8: a disc with the identity's two-colour stripes (`stripes` periods across it; angle and
    offset jittered a little, brightness by a few percent) on a flat background."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    angle = identity.angle + rng.normal(0.0, 0.08)
    phase = (dx * math.cos(angle) + dy * math.sin(angle)) / (2 * radius) * stripes
    stripe = (np.floor(phase + identity.phase + rng.normal(0.0, 0.05)) % 2).astype(bool)
    brightness = rng.uniform(0.9, 1.1)
    colours = np.clip(np.array(identity.colours, np.float32) * brightness, 0, 255)
    image = np.broadcast_to(background.astype(np.float32), (size, size, 3)).copy()
    inside = dx**2 + dy**2 <= radius**2
    image[inside & stripe] = colours[0]
    image[inside & ~stripe] = colours[1]
    return image.round().astype(np.uint8)


def random_background(rng: np.random.Generator) -> np.ndarray:
    return np.full(3, rng.uniform(60, 200), np.float32) + rng.normal(0, 8, 3)


def render_target(identity: SyntheticIdentity, size: int, rng: np.random.Generator) -> np.ndarray:
    """A target image: the face near the centre at about the same size (as in an aligned face data set like
    CelebA-HQ), on a random background."""
    centre = tuple(size / 2 + rng.normal(0, size * 0.04, 2))
    return render_face(identity, size, centre, size * rng.uniform(0.36, 0.44), random_background(rng), rng)


def render_face_crop(identity: SyntheticIdentity, rng: np.random.Generator) -> np.ndarray:
    """A CLIP crop: the face centred and large, as aligned crops are."""
    size = CLIP_CROP_SIZE
    centre = tuple(size / 2 + rng.normal(0, 4, 2))
    return render_face(identity, size, centre, size * rng.uniform(0.36, 0.42), random_background(rng), rng)


def face_embedding(identity: SyntheticIdentity, rng: np.random.Generator, noise: float = 0.5) -> np.ndarray:
    """The identity's unit vector plus isotropic noise of norm about `noise`, L2-normalised (as ArcFace's are)."""
    dim = len(identity.embedding)
    vector = identity.embedding + rng.standard_normal(dim) * noise / math.sqrt(dim)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


@dataclass(frozen=True)
class SyntheticImage:
    identity: str
    path: Path
    """The target image file."""
    clip_crop: np.ndarray
    """(224, 224, 3) uint8."""
    arcface: np.ndarray
    """(D,) float32, unit norm."""


def make_images(identities: list[SyntheticIdentity], per_identity: int, folder: Path, resolution: int,
                rng: np.random.Generator, image_scale: int = 1) -> dict[str, list[SyntheticImage]]:
    """`per_identity` images of each identity: the target image (written as PNG, `image_scale` times the training
    resolution, so loading resizes it as it would a photo), its face crop and its face embedding."""
    images: dict[str, list[SyntheticImage]] = {}
    for identity in identities:
        (folder / identity.name).mkdir(parents=True, exist_ok=True)
        images[identity.name] = []
        for index in range(per_identity):
            path = folder / identity.name / f"{index:03d}.png"
            Image.fromarray(render_target(identity, resolution * image_scale, rng)).save(path)
            images[identity.name].append(SyntheticImage(identity.name, path, render_face_crop(identity, rng),
                                                        face_embedding(identity, rng)))
    return images


def write_cache(folder: Path, images: list[SyntheticImage], face_dim: int, face_model: str = FACE_MODEL) -> Path:
    """A finished training cache (train/cache.py's format, one shard, no augmented copies) holding `images` in order,
    as `python -m train prepare` would write it after analysing them."""
    shard = SHARD_PATTERN.format(0)
    save_arrays(folder / shard, {
        "arcface": np.stack([image.arcface for image in images]),
        "clip_crop": np.stack([image.clip_crop for image in images]),
        "arcface_aug": np.zeros((len(images), 0, face_dim), np.float32),
        "clip_crop_aug": np.zeros((len(images), 0, CLIP_CROP_SIZE, CLIP_CROP_SIZE, 3), np.uint8),
    })
    records = []
    for row, image in enumerate(images):
        size = Image.open(image.path).size[0]
        records.append(CacheRecord(
            row=row, identity=image.identity, image=str(image.path.resolve()), caption=CAPTION, class_word=CLASS_WORD,
            shard=shard, shard_row=row, box=(0.0, 0.0, float(size), float(size)), landmarks=((0.0, 0.0),) * 5,
            faces_in_image=1,
        ))
    settings = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "face_model": face_model, "face_embed_dim": face_dim,
        "det_size": 0, "min_face_size": 0, "min_images": 1, "augmentations": 0, "seed": 0,
        "clip_crop_size": CLIP_CROP_SIZE, "clip_crop_scale": 1.0, "source": "synthetic", "shard_size": len(images),
        "source_fingerprint": "synthetic",
    }
    report = PrepareReport(kept_images=len(images), kept_identities=len({image.identity for image in images}),
                           skipped=[], dropped_identities=[])
    write_text_atomic(folder / INDEX_FILE, "".join(json.dumps(record.to_json()) + "\n" for record in records))
    write_text_atomic(folder / REPORT_FILE, json.dumps(report.to_json(), indent=2) + "\n")
    write_text_atomic(folder / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
    return folder


# ---- the base model: trained on the images without identity ----------------------------------------------------

def pretrain_base(parts: BaseComponents, image_paths: list[Path], resolution: int, steps: int, batch_size: int,
                  lr: float, seed: int) -> list[float]:
    """Calibrate the VAE's scaling factor (1 / std of the latents, as SD's 0.18215 was chosen) and train the whole
    UNet on the images with the plain caption (ε-MSE, Adam): a base model that knows people in general and no
    identity. Returns the losses."""
    from train.data import load_target_image

    pixels = torch.stack([load_target_image(path, resolution)[0] for path in image_paths])
    with torch.no_grad():
        latents = parts.vae.encode(pixels).latent_dist.mean
    scale = float(1.0 / latents.std())
    parts.vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    tokens = parts.tokenizer([CAPTION], padding="max_length", max_length=parts.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        context = parts.text_encoder(tokens).last_hidden_state
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parts.unet.parameters(), lr=lr)
    parts.unet.train()
    losses = []
    for _ in tqdm(range(steps), desc="base UNet", leave=False):
        chosen = torch.randint(0, len(latents), (batch_size,), generator=generator)
        noise = torch.randn(latents[chosen].shape, generator=generator)
        timesteps = torch.randint(0, parts.scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = parts.scheduler.add_noise(latents[chosen], noise, timesteps)
        prediction = parts.unet(noisy, timesteps, encoder_hidden_states=context.expand(batch_size, -1, -1)).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    parts.unet.eval()
    return losses


# ---- the trainer's inner loop ------------------------------------------------------------------------------------

@dataclass
class Session:
    """A training run's state: the trainer's step module (frozen models + the adapter), its optimizer and its plan."""

    config: FitConfig
    cache: TrainCache
    step_module: IDAdapterTrainingStep | InvAdapterTrainingStep
    clip: ClipVision | None
    """None for Inv-Adapter (it has no CLIP vision model)."""
    optimizer: torch.optim.Optimizer
    plan: SamplePlan

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def assemble(self):
        """The trainer's batch assembly for the session's method."""
        return assemble_inv_adapter_batch if self.config.method == "inv-adapter" else assemble_batch


def start_session(config: FitConfig, adjust: Callable[[torch.nn.Module], None] | None = None) -> Session:
    """What train.fit does before its loop, on one CPU process: seed, load the models, build the adapter, Adam over its
    trainable parameters. `adjust` changes the step module before the optimizer is made (the ablations)."""
    torch.manual_seed(config.seed)
    cache = TrainCache(config.cache)
    step_module, clip = build_training_step(config, cache, torch.device("cpu"))
    if adjust is not None:
        adjust(step_module)
    step_module.train()
    optimizer = torch.optim.Adam(step_module.adapter.parameters(), lr=config.lr)
    plan = SamplePlan(cache, config.seed, config.num_refs, config.identity_dropout, config.random_flip)
    return Session(config, cache, step_module, clip, optimizer, plan)


def frozen_features(session: Session, cache: TrainCache, enabled: bool = True) -> FrozenFeatures:
    """The trainer's frozen-feature store over `cache`, with the session's VAE and CLIP vision model."""
    from idadapter_core import clip_encoder_from_transformers

    vae = session.step_module.frozen.base.vae
    clip_encoder = None if session.clip is None else clip_encoder_from_transformers(session.clip.model)
    return FrozenFeatures(cache, vae, clip_encoder, session.config.resolution, session.device, enabled=enabled)


def train_step(session: Session, features: FrozenFeatures, step: int) -> dict[str, float]:
    """Optimizer step `step`, as train.fit's loop runs it (one process, no gradient accumulation, no mixed
    precision): the plan's samples, the method's batch assembly, the step module's loss, backward, Adam."""
    samples = session.plan.step_samples(step, session.config.batch_size)
    base = session.step_module.frozen.base
    batch = session.assemble(samples, features, session.cache, base.text, base.vae.config,
                             base.noise_scheduler.config.num_train_timesteps, session.device)
    losses = session.step_module(batch)
    losses["loss"].backward()
    session.optimizer.step()
    session.optimizer.zero_grad()
    session.step_module.release()
    return {name: float(value.detach()) for name, value in losses.items()}


# ---- the ablations (DESIGN.md §2.8, Table 2) ----------------------------------------------------------------------

class TriggerWordOwnEmbedding(TextConditioning):
    """Prompts keep ', <class> is <trigger>', but the trigger word keeps its own input embedding: no E_c."""

    def encode(self, token_ids, identity_tokens=None):
        return super().encode(token_ids, None)


def token_only(step_module: IDAdapterTrainingStep) -> None:
    """The paper's "No MFF (no E_r)": every adapter gate stays closed (γ = 0, frozen), so E_r changes nothing."""
    for block in step_module.adapter.blocks:
        block.alpha_attn.requires_grad_(False)
        block.alpha_dense.requires_grad_(False)


def adapter_only(step_module: IDAdapterTrainingStep) -> None:
    """The paper's "No Text Embedding (no E_c)": the identity token is not spliced into the prompt."""
    base = step_module.frozen.base
    base.text = TriggerWordOwnEmbedding(base.text.encoders, base.text.trigger_word, base.text.sdxl)
    step_module.adapter.id_token.requires_grad_(False)


def highest_resolution_blocks(step_module: IDAdapterTrainingStep) -> list[int]:
    """The blocks Apply IDAdapter's faster mode (`blocks = skip highest resolution`) leaves the adapter out of."""
    layout = step_module.frozen.base.layout
    kept = adapter_blocks(layout, "skip highest resolution")
    return [index for index in range(layout.num_blocks) if index not in kept]


def skip_highest_resolution(step_module: IDAdapterTrainingStep) -> None:
    """The faster mode at training: the adapters of the highest-resolution blocks stay closed (γ = 0, frozen), which
    is exactly what leaving them out does; the cross-attention K/V differences train in every block, as the node
    applies them in every block in this mode too."""
    for index in highest_resolution_blocks(step_module):
        block = step_module.adapter.blocks[index]
        block.alpha_attn.requires_grad_(False)
        block.alpha_dense.requires_grad_(False)


@contextmanager
def highest_resolution_skipped(step_module: IDAdapterTrainingStep) -> Iterator[None]:
    """The faster mode at inference on a model trained with every block: those blocks' gates closed meanwhile."""
    gates = [gate for index in highest_resolution_blocks(step_module)
             for gate in (step_module.adapter.blocks[index].alpha_attn, step_module.adapter.blocks[index].alpha_dense)]
    saved = [gate.detach().clone() for gate in gates]
    with torch.no_grad():
        for gate in gates:
            gate.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for gate, value in zip(gates, saved):
                gate.copy_(value)


def self_attention_only(step_module: InvAdapterTrainingStep) -> None:
    """Inv-Adapter without its cross-attention branch: W''_V stays 0 (frozen), so that branch adds an exact 0."""
    for block in step_module.adapter.blocks:
        block.cross_k.requires_grad_(False)
        block.cross_v.requires_grad_(False)


def cross_attention_only(step_module: InvAdapterTrainingStep) -> None:
    """Inv-Adapter without its self-attention branch: the gate stays closed (γ = 0, frozen)."""
    for block in step_module.adapter.blocks:
        for parameter in (block.self_gate, block.self_k.weight, block.self_v.weight):
            parameter.requires_grad_(False)


@dataclass(frozen=True)
class Variant:
    """One trained setting: the method, trainer settings that differ from the method's default, and a change to the
    step module before its optimizer is made."""

    method: str
    adjust: Callable[[torch.nn.Module], None] | None = None
    config: tuple[tuple[str, object], ...] = ()


FULL_IDADAPTER, SKIPPED = "full (E_r + E_c)", "skip highest resolution (training and inference)"
SKIPPED_AT_INFERENCE = "full, skip highest resolution at inference only"
"""Not trained on its own: the full model evaluated with the faster mode."""
VARIANTS: dict[str, Variant] = {
    FULL_IDADAPTER: Variant("idadapter"),
    "identity token only": Variant("idadapter", token_only),
    "adapter only": Variant("idadapter", adapter_only),
    SKIPPED: Variant("idadapter", skip_highest_resolution),
    "Inv-Adapter, forward-noised references": Variant("inv-adapter"),
    "Inv-Adapter, noised, self-attention only": Variant("inv-adapter", self_attention_only),
    "Inv-Adapter, noised, cross-attention only": Variant("inv-adapter", cross_attention_only),
    "Inv-Adapter, DDIM-inverted references": Variant("inv-adapter", config=(("reference_features", "inversion"),)),
}
METHODS = ("idadapter", "inv-adapter")


def method_variants(method: str) -> list[str]:
    return [name for name, variant in VARIANTS.items() if variant.method == method]


# ---- the check -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSet:
    """Held-out targets (rows of the evaluation cache) and, per target, N references of its own identity and N of
    another identity (rows of training images)."""

    targets: list[int]
    matching: list[tuple[ReferenceKey, ...]]
    shuffled: list[tuple[ReferenceKey, ...]]
    timesteps: list[int]


def make_eval_set(cache: TrainCache, held_out: list[int], num_refs: int, timesteps: list[int],
                  rng: np.random.Generator) -> EvalSet:
    """References are drawn from each identity's training images (the rows not in `held_out`); the shuffled ones come
    from the next identity in a random cyclic order of the identities (never the target's own)."""
    held = set(held_out)
    training_rows = {name: [r.row for r in records if r.row not in held]
                     for name, records in cache.identities().items()}
    order = list(rng.permutation(sorted(training_rows)))
    other = {name: order[(i + 1) % len(order)] for i, name in enumerate(order)}

    def draw(identity: str) -> tuple[ReferenceKey, ...]:
        return tuple(ReferenceKey(int(r)) for r in rng.choice(training_rows[identity], num_refs, replace=False))

    identities = [cache.records[row].identity for row in held_out]
    return EvalSet(held_out, [draw(name) for name in identities], [draw(other[name]) for name in identities], timesteps)


@torch.no_grad()
def held_out_loss(session: Session, features: FrozenFeatures, eval_set: EvalSet, condition: str) -> float:
    """Mean diffusion loss over the held-out targets and the timestep grid, with fixed noise (each (target,
    timestep) pair has its own seed, the same in every condition and every model). condition: 'matching',
    'shuffled' or 'no identity' (IDAdapter: E_r zeroed and the plain caption, as identity dropout trains it;
    Inv-Adapter, whose reference is its first reference: the EAA off, i.e. the base model)."""
    base = session.step_module.frozen.base
    keep = condition != "no identity"
    inv_binding = session.step_module.frozen.binding if session.config.method == "inv-adapter" else None
    if inv_binding is not None:
        inv_binding.weight = 1.0 if keep else 0.0
    session.step_module.eval()
    losses = []
    for index, row in enumerate(eval_set.targets):
        references = eval_set.shuffled[index] if condition == "shuffled" else eval_set.matching[index]
        samples = [Sample(index=0, row=row, references=references, keep_identity=keep, flip=False,
                          seed=1_000_003 * index + k) for k in range(len(eval_set.timesteps))]
        batch = session.assemble(samples, features, features.cache, base.text, base.vae.config,
                                 base.noise_scheduler.config.num_train_timesteps, session.device)
        batch = replace(batch, timesteps=torch.tensor(eval_set.timesteps))
        losses.append(float(session.step_module(batch)["diffusion_loss"]))
        session.step_module.release()
    session.step_module.train()
    if inv_binding is not None:
        inv_binding.weight = 1.0
    return statistics.fmean(losses)


CONDITIONS = ("matching", "shuffled", "no identity")


def identity_probe(features: FrozenFeatures, held_out: list[int]) -> dict[str, float]:
    """How much identity each input carries: nearest-centroid accuracy on the held-out images, with centroids of the
    training images, of the CLIP image embedding (E_c is made from it alone), the mean CLIP patch token and the
    ArcFace embedding (both go into E_r). Chance is 1 / identities."""
    cache = features.cache
    inputs = features.references([(ReferenceKey(row),) for row in range(len(cache))])
    identity = np.array([record.identity for record in cache.records])
    training = np.ones(len(cache), bool)
    training[held_out] = False
    accuracy = {}
    for name, values in (("CLIP image embedding", inputs["clip_image_embeds"][:, 0]),
                         ("CLIP patch tokens (mean)", inputs["clip_patches"][:, 0].mean(dim=1)),
                         ("ArcFace embedding", inputs["face_embeds"][:, 0])):
        values = values.numpy()
        names = sorted(set(identity))
        centroids = np.stack([values[training & (identity == name)].mean(axis=0) for name in names])
        nearest = ((values[held_out][:, None] - centroids[None]) ** 2).sum(-1).argmin(axis=1)
        accuracy[name] = float(np.mean(np.array(names)[nearest] == identity[held_out]))
    return accuracy


@dataclass
class Settings:
    identities: int = 8
    train_images: int = 24
    """Per identity: training images (targets and references)."""
    held_out_images: int = 2
    """Per identity: held-out target images."""
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    """Adam's learning rate for the tiny adapter (the paper's 3e-5 is for the full-size one; our choice)."""
    base_steps: int = 300
    base_batch_size: int = 16
    base_lr: float = 2e-3
    num_refs: int = 4
    mff_width: int = 32
    identity_dropout: float = 0.1
    """IDAdapter's (Inv-Adapter trains without: it has no "without identity" input)."""
    inversion_steps: int = 25
    """DDIM inversion steps of Inv-Adapter's inverted references."""
    face_dim: int = 32
    timesteps: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 800, 900)


@dataclass
class SeedResult:
    seed: int
    base_model_loss: float
    """Held-out loss of the base model alone: the untrained adapter without identity (gates and K/V deltas are 0, the
    plain caption), which is the base model with the caption it was trained with."""
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    """variant -> condition -> held-out loss."""
    probe: dict[str, float] = field(default_factory=dict)
    """`identity_probe` of the seed's data and CLIP model."""
    seconds: float = 0.0

    def gap(self, variant: str) -> float:
        return self.losses[variant]["shuffled"] - self.losses[variant]["matching"]


def run_seed(seed: int, settings: Settings, spec: ModelSpec, workdir: Path,
             variants: list[str] | None = None) -> SeedResult:
    """New identities, images, base model and CLIP model from `seed`; each variant (default: all of `VARIANTS`)
    trained from the same start (per method, the same adapter initialisation; the same sample order)."""
    started = time.perf_counter()
    variants = list(VARIANTS) if variants is None else variants
    rng = np.random.default_rng(seed)
    identities = make_identities(settings.identities, settings.face_dim, rng)
    per_identity = settings.train_images + settings.held_out_images
    images = make_images(identities, per_identity, workdir / "images", spec.resolution, rng)
    training = [image for name in images for image in images[name][:settings.train_images]]
    held_out = [image for name in images for image in images[name][settings.train_images:]]
    train_cache = write_cache(workdir / "train-cache", training, settings.face_dim)
    eval_cache = TrainCache(write_cache(workdir / "eval-cache", training + held_out, settings.face_dim))
    eval_set = make_eval_set(eval_cache, list(range(len(training), len(eval_cache))), settings.num_refs,
                             list(settings.timesteps), rng)

    log.info("seed %d: training the base UNet on %d images without identity", seed, len(training))
    parts = build_base_components(spec, seed)
    pretrain_base(parts, [image.path for image in training], spec.resolution, settings.base_steps,
                  settings.base_batch_size, settings.base_lr, seed)
    base_folder = save_base_model(parts, workdir / "base")
    clip_folder = write_clip_vision(spec, workdir / "clip", seed)
    method_settings = method_configs(settings, train_cache, base_folder, clip_folder, workdir / "out", spec, seed)
    result = SeedResult(seed, base_model_loss=math.nan)
    for name in variants:
        variant = VARIANTS[name]
        session = start_session(resolve_config(None, {**method_settings[variant.method], **dict(variant.config)}),
                                variant.adjust)
        eval_features = frozen_features(session, eval_cache)
        if math.isnan(result.base_model_loss):
            result.base_model_loss = held_out_loss(session, eval_features, eval_set, "no identity")
        if not result.probe and session.clip is not None:
            result.probe = identity_probe(eval_features, eval_set.targets)
        features = frozen_features(session, session.cache)
        for step in tqdm(range(settings.steps), desc=f"seed {seed}: {name}", leave=False):
            train_step(session, features, step)
        result.losses[name] = {c: held_out_loss(session, eval_features, eval_set, c) for c in CONDITIONS}
        if name == FULL_IDADAPTER and SKIPPED in variants:
            with highest_resolution_skipped(session.step_module):
                result.losses[SKIPPED_AT_INFERENCE] = {
                    c: held_out_loss(session, eval_features, eval_set, c) for c in CONDITIONS}
        log.info("seed %d, %s: %s; gap %.4f", seed, name,
                 ", ".join(f"{c} {v:.4f}" for c, v in result.losses[name].items()), result.gap(name))
    result.seconds = time.perf_counter() - started
    return result


def method_configs(settings: Settings, train_cache: Path, base_folder: Path, clip_folder: Path, output_dir: Path,
                   spec: ModelSpec, seed: int) -> dict[str, dict]:
    """Per method, the trainer's settings (`resolve_config` overrides) every variant of it starts from."""
    common = dict(cache=str(train_cache), output_dir=str(output_dir), pretrained=str(base_folder),
                  num_refs=settings.num_refs, batch_size=settings.batch_size, lr=settings.lr, max_steps=settings.steps,
                  resolution=spec.resolution, seed=seed, log_with="none", face_id_weight=0.0)
    return {
        "idadapter": dict(common, clip_vision=str(clip_folder), mff_width=settings.mff_width,
                          mff_heads=4, identity_dropout=settings.identity_dropout),
        "inv-adapter": dict(common, method="inv-adapter", identity_dropout=0.0,
                            inversion_steps=settings.inversion_steps),
    }


# ---- report ------------------------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict[str, float]:
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values))


def summarize(settings: Settings, results: list[SeedResult]) -> dict:
    variants = {}
    for variant in results[0].losses:
        gaps = [r.gap(variant) for r in results]
        variants[variant] = dict(
            **{condition: spread([r.losses[variant][condition] for r in results]) for condition in CONDITIONS},
            gap=spread(gaps), relative_gap=spread([r.gap(variant) / r.losses[variant]["matching"] for r in results]),
            positive_gaps=sum(g > 0 for g in gaps),
        )
    skip_ratios = {name: spread([r.gap(name) / r.gap(FULL_IDADAPTER) for r in results])
                   for name in (SKIPPED, SKIPPED_AT_INFERENCE) if name in variants and FULL_IDADAPTER in variants}
    checked = [names[0] for method in METHODS if (names := [v for v in method_variants(method) if v in variants])]
    return dict(
        settings=asdict(settings), torch=torch.__version__, seeds=[asdict(r) for r in results], variants=variants,
        base_model_loss=spread([r.base_model_loss for r in results]), skip_gap_ratio=skip_ratios,
        probe={name: statistics.fmean(r.probe[name] for r in results) for name in results[0].probe},
        checked=checked,
        check="PASS" if all(variants[name]["positive_gaps"] == len(results) for name in checked) else "FAIL",
    )


def print_table(summary: dict) -> None:
    s = summary["settings"]
    seeds = summary["seeds"]
    print(f"\nIdentity learning, the paper's Table 2 ablation in miniature (IDAdapter), Inv-Adapter's branches and "
          f"reference features, the faster mode: {s['identities']} synthetic identities x {s['train_images']} training "
          f"images; tiny models ({TINY_SPEC.resolution} px); base UNet trained {s['base_steps']} steps without "
          f"identity, then the adapter {s['steps']} steps (batch {s['batch_size']}, Adam lr {s['lr']:g}; IDAdapter: "
          f"N = {s['num_refs']}, identity dropout {s['identity_dropout']:g}, no face-ID loss; Inv-Adapter: one "
          f"reference image, {s['inversion_steps']} DDIM inversion steps). Held out: {s['held_out_images']} images of "
          "each TRAINING identity, never a target or a reference in training. Loss: ε-MSE at t = "
          f"{', '.join(map(str, s['timesteps']))}, fixed noise per (image, t). "
          f"Seeds {', '.join(str(r['seed']) for r in seeds)}: mean ± sample std [min .. max].\n")
    cell = lambda v, digits=4: f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    header = ("variant", "matching refs", "shuffled refs", "no identity", "gap shuffled - matching", "gap > 0")
    rows = [(name, cell(v["matching"]), cell(v["shuffled"]), cell(v["no identity"]),
             f"{cell(v['gap'])} [{v['gap']['min']:.4f} .. {v['gap']['max']:.4f}]",
             f"{v['positive_gaps']}/{len(seeds)}") for name, v in summary["variants"].items()]
    rows.append(("base model alone", cell(summary["base_model_loss"]), "", "", "", ""))
    widths = [max(len(row[i]) for row in [header, *rows]) + 2 for i in range(len(header))]
    for row in [header, *rows]:
        print("".join(f"{text:<{width}}" for text, width in zip(row, widths)))
    print("\nper seed, gap (shuffled - matching) per variant: " + "; ".join(
        f"seed {r['seed']}: " + ", ".join(f"{name} {r['losses'][name]['shuffled'] - r['losses'][name]['matching']:+.4f}"
                                          for name in r["losses"]) + f" ({r['seconds']:.0f} s)" for r in seeds))
    print("No identity: IDAdapter's E_r zeroed with the plain caption; Inv-Adapter's EAA off (the base model).")
    for name in summary["checked"]:
        relative = summary["variants"][name]["relative_gap"]
        print(f"{name}: the gap is {relative['mean']:.1%} ± {relative['std']:.1%} of the matching loss.")
    for name, ratio in summary["skip_gap_ratio"].items():
        print(f"Faster mode, gap ratio {name} ÷ full: {cell(ratio, 2)} [{ratio['min']:.2f} .. {ratio['max']:.2f}]")
    print(f"Check (gap > 0 in every seed for {', '.join(summary['checked'])}): {summary['check']}.")
    if FULL_IDADAPTER in summary["variants"]:
        print("The paper's Table 2 (ID-Sim, full size): full 0.603, no E_r 0.517, no E_c 0.394.")
    if summary["probe"]:
        print("Identity in the inputs, nearest-centroid accuracy on the held-out images "
              f"(chance {1 / s['identities']:.2f}): "
              + ", ".join(f"{name} {value:.2f}" for name, value in summary["probe"].items())
              + ". E_c is made from the CLIP image embedding alone; E_r also sees the ArcFace embedding.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the training steps")
    parser.add_argument("--method", choices=(*METHODS, "both"), default="idadapter",
                        help="whose variants to train (default idadapter: its ablations and the faster mode)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                        help="train these variants instead of --method's (quoted names: " + "; ".join(VARIANTS) + ")")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are FIRST_SEED, FIRST_SEED + 1, ... (default 0)")
    parser.add_argument("--steps", type=int, help=f"adapter training steps (default {Settings.steps})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models run fastest so)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("train.models", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings()
    settings.steps = args.steps or (settings.steps // 2 if args.quick else settings.steps)
    variants = args.variants or [name for method in (METHODS if args.method == "both" else (args.method,))
                                 for name in method_variants(method)]
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        with tempfile.TemporaryDirectory() as folder:
            results.append(run_seed(seed, settings, TINY_SPEC, Path(folder), variants))
        if args.json:  # after every seed, so an interrupted run keeps what it finished
            args.json.write_text(json.dumps(summarize(settings, results), indent=2))
    print_table(summarize(settings, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
