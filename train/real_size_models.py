"""Model folders at real size with random weights, written as the trainer loads real ones: a diffusers
StableDiffusionPipeline of a base (its layout a `BaseSpec`: the real ones are bench/common.py's `BASES`), a
CLIPVisionModelWithProjection, and an insightface pack made of a real detector file and an IResNet exported as
insightface exports its recognizers (glintr100.onnx is antelopev2's IResNet-100), plus the real photos of two
identities. `quick` swaps in the trainer's tiny models and an IResNet of one block per stage: the same code paths in
seconds. And training batches of random tensors in a base's shapes. Used by bench/real_scale.py and its tests."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from train.insightface_archs import IRESNET100_STAGES, IRESNET_WIDTHS, IResNet, export_like_insightface, randomize

log = logging.getLogger(__name__)

TEXT_VOCAB, TEXT_TOKENS = 49408, 77
"""CLIP's token-embedding table and context length; the tokenizer is the trainer's tiny one with 77 tokens."""
FACE_PACK = "realscale_antelope"
DETECTOR = Path("insightface") / "models" / "standin_scrfd_mbf128" / "det_2.5g.onnx"
"""The real SCRFD-2.5G detector, under the assets folder."""
PHOTOS = {"obama": ("obama.jpg", "obama2.jpg", "obama3.jpg"), "biden": ("biden.jpg",)}
"""The real photos of the assets' faces/ folder, by identity."""


@dataclass(frozen=True)
class RecognizerLayout:
    stages: tuple[int, ...]
    widths: tuple[int, ...]
    embed_dim: int


IRESNET100 = RecognizerLayout(IRESNET100_STAGES, IRESNET_WIDTHS, 512)
QUICK_IRESNET = RecognizerLayout((1, 1, 1, 1), (8, 16, 32, 64), 64)


def recognizer_layout(quick: bool) -> RecognizerLayout:
    return QUICK_IRESNET if quick else IRESNET100


@dataclass(frozen=True)
class BaseSpec:
    """A base model's parts as diffusers/transformers constructor arguments."""

    unet: dict
    texts: tuple[dict, ...]
    """One CLIPTextConfig kwargs per text encoder (SDXL: l, then g)."""
    vae: dict
    resolution: int


def write_base_model(folder: Path, spec: BaseSpec, seed: int = 0) -> Path:
    """A diffusers StableDiffusionPipeline folder of an SD1.x/2.x `spec` with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from train.tiny_models import sd_pipeline, sd_scheduler, text_encoder, tiny_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(max_length=TEXT_TOKENS)
    text = text_encoder(tokenizer, TEXT_TOKENS, vocab_size=TEXT_VOCAB, **spec.texts[0])
    vae = AutoencoderKL(sample_size=spec.resolution, **spec.vae)
    unet = UNet2DConditionModel(**dict(spec.unet, sample_size=spec.resolution // 8))
    sd_pipeline(vae, text, tokenizer, unet, sd_scheduler()).save_pretrained(folder)
    return folder


def write_face_pack(root: Path, quick: bool, assets: Path) -> Path:
    """ROOT/models/realscale_antelope/: the real detector and a random IResNet exported as insightface exports its
    recognizers (glintr100.onnx is antelopev2's IResNet-100)."""
    folder = root / "models" / FACE_PACK
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(assets / DETECTOR, folder / DETECTOR.name)
    layout = recognizer_layout(quick)
    if not (folder / "glintr100.onnx").is_file():
        recognizer = IResNet(layout.stages, layout.widths, layout.embed_dim)
        export_like_insightface(randomize(recognizer, seed=0), folder / "glintr100.onnx")
    return root


def write_photos(folder: Path, assets: Path) -> Path:
    """FOLDER/<identity>/<photo>: `prepare`'s input layout, from the assets' real photos."""
    for identity, names in PHOTOS.items():
        (folder / identity).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(assets / "faces" / name, folder / identity / name)
    return folder


@dataclass
class ModelFolders:
    base: Path
    clip_vision: Path
    insightface_root: Path
    photos: Path


def write_models(workdir: Path, base: BaseSpec, clip_vision: dict, quick: bool, assets: Path) -> ModelFolders:
    """Every folder a real-size rehearsal loads, under `workdir` (kept ones are reused)."""
    from train.tiny_models import write_clip_vision, write_tiny_clip_vision, write_tiny_pipeline

    started = time.perf_counter()
    base_folder = workdir / "base"
    if not (base_folder / "model_index.json").is_file():
        write_tiny_pipeline(base_folder, "sd15") if quick else write_base_model(base_folder, base)
    clip = workdir / "clip_vision"
    if not (clip / "config.json").is_file():
        write_tiny_clip_vision(clip) if quick else write_clip_vision(clip, clip_vision, seed=0)
    folders = ModelFolders(base_folder, clip, write_face_pack(workdir / "insightface", quick, assets),
                           write_photos(workdir / "photos", assets))
    log.info("model folders written in %.0f s", time.perf_counter() - started)
    return folders



# ---- adapters that act ---------------------------------------------------------------------------------------------

def open_idadapter(adapter, gate: float = 0.5, kv_std: float = 0.0):
    """`adapter` (an IDAdapter, random weights) made to act, in place, and returned in eval mode: both gates of every
    block at `gate` (training starts them at 0) and, with `kv_std`, random cross-attention K/V differences."""
    with torch.no_grad():
        for block in adapter.blocks:
            block.alpha_attn.fill_(gate)
            block.alpha_dense.fill_(gate)
        if kv_std:
            for kv in adapter.cross_kv:
                kv.to_k.diff.normal_(std=kv_std)
                kv.to_v.diff.normal_(std=kv_std)
    return adapter.eval()


def open_inv_adapter(adapter, self_gate: float = 0.7, cross_std: float = 0.02):
    """`adapter` (an InvAdapter) made to act, in place, and returned in eval mode: the self-attention gates open and a
    non-zero cross branch, so that every part of the EAA does work."""
    with torch.no_grad():
        for block in adapter.blocks:
            block.self_gate.fill_(self_gate)
            torch.nn.init.normal_(block.cross_v.weight, std=cross_std)
    return adapter.eval()


# ---- random training batches ------------------------------------------------------------------------------------

def random_idadapter_batch(base, batch: int, resolution: int, num_refs: int, face_dim: int, clip_dim: int,
                           patches: int, embed_dim: int):
    """An IDAdapter training batch of random latents and reference features in the shapes of `base` (a loaded
    `train.models` base) at `resolution`."""
    from train.fit import TrainingBatch

    g = torch.Generator().manual_seed(batch)
    latent = resolution // 8
    keep = [True] * batch
    return TrainingBatch(
        latents=torch.randn(batch, 4, latent, latent, generator=g), noise=torch.randn(batch, 4, latent, latent, generator=g),
        timesteps=torch.full((batch,), 500), clip_patches=torch.randn(batch, num_refs, patches, clip_dim, generator=g),
        clip_image_embeds=torch.randn(batch, num_refs, embed_dim, generator=g),
        face_embeds=torch.randn(batch, num_refs, face_dim, generator=g), keep_identity=torch.tensor(keep),
        token_ids=base.text.tokenize(["a photo of a person"] * batch, ["person"] * batch, keep),
        time_ids=torch.zeros(batch, 6))


def random_inv_adapter_batch(base, batch: int, resolution: int):
    """An Inv-Adapter training batch of random latents (target and reference) at `resolution`."""
    from train.inv_adapter_step import InvAdapterBatch

    g = torch.Generator().manual_seed(batch)
    shape = (batch, 4, resolution // 8, resolution // 8)
    plain = [False] * batch
    return InvAdapterBatch(
        latents=torch.randn(shape, generator=g), noise=torch.randn(shape, generator=g),
        timesteps=torch.full((batch,), 500), reference_latents=torch.randn(shape, generator=g),
        reference_noise=torch.randn(shape, generator=g), reference_rows=list(range(batch)),
        token_ids=base.text.tokenize(["a photo of a person"] * batch, [""] * batch, plain),
        null_token_ids=base.text.tokenize([""] * batch, [""] * batch, plain), time_ids=torch.zeros(batch, 6))


def on_device(batch, device: torch.device):
    """A batch dataclass with its tensors (and dicts of tensors) moved to `device`."""
    from dataclasses import fields, replace

    moved = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if torch.is_tensor(value):
            moved[f.name] = value.to(device)
        elif isinstance(value, dict):
            moved[f.name] = {k: v.to(device) for k, v in value.items()}
    return replace(batch, **moved)
