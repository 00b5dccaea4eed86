"""Model folders at real size with random weights, written as the trainer loads real ones: a diffusers
StableDiffusionPipeline of a base (its layout a `BaseSpec`: the real ones are bench/common.py's `BASES`), a
CLIPVisionModelWithProjection, and an insightface pack made of a real detector file and an IResNet exported as
insightface exports its recognizers (glintr100.onnx is antelopev2's IResNet-100), plus the real photos of two
identities. `quick` swaps in the trainer's tiny models and an IResNet of one block per stage: the same code paths in
seconds. Used by bench/real_scale.py and its tests."""
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
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    steps_offset=1, prediction_type="epsilon")
"""SD1.5's and SD2.1-base's (512 px, ε) noise schedule."""
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
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from train.tiny_models import tiny_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(max_length=TEXT_TOKENS)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=TEXT_VOCAB, max_position_embeddings=TEXT_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec.texts[0]))
    vae = AutoencoderKL(sample_size=spec.resolution, **spec.vae)
    unet = UNet2DConditionModel(**dict(spec.unet, sample_size=spec.resolution // 8))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def write_clip_vision(folder: Path, config: dict | None, seed: int = 0) -> Path:
    """A CLIPVisionModelWithProjection folder of `config` (CLIPVisionConfig kwargs; None: the trainer's tiny one)."""
    if config is None:
        from train.tiny_models import write_tiny_clip_vision

        return write_tiny_clip_vision(folder, seed)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).save_pretrained(folder)
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
    from train.tiny_models import write_tiny_pipeline

    started = time.perf_counter()
    base_folder = workdir / "base"
    if not (base_folder / "model_index.json").is_file():
        write_tiny_pipeline(base_folder, "sd15") if quick else write_base_model(base_folder, base)
    clip = workdir / "clip_vision"
    if not (clip / "config.json").is_file():
        write_clip_vision(clip, None if quick else clip_vision)
    folders = ModelFolders(base_folder, clip, write_face_pack(workdir / "insightface", quick, assets),
                           write_photos(workdir / "photos", assets))
    log.info("model folders written in %.0f s", time.perf_counter() - started)
    return folders
