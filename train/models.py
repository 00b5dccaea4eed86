"""The models of a training run, all from local files (nothing is downloaded): the base model (a diffusers folder, or a
single-file checkpoint with a local config folder), its prompt encoders with the identity token, the CLIP vision
model, the face-ID loss's insightface models, and the trainable IDAdapter sized from all of them.

SD1.5, SD2.1 (ε and v-prediction: the scheduler's `prediction_type` decides) and SDXL (two text encoders, keyed `l`
and `g` as the presets key them; pooled text embeds and add_time_ids) go through the same code; the UNet layout
comes from `layout_from_diffusers_unet`, so a UNet without a preset trains as a 'custom' base.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from idadapter_core import (
    IDAdapterConfig, MFFConfig, UNetLayout, format_identity_prompt, layout_from_diffusers_unet,
    match_preset, splice_identity_token,
)
from idadapter_core.errors import IDAdapterError
from idadapter_core.face import load_face_analyzer

from .config import FitConfig

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")


class ModelLoadError(IDAdapterError):
    """A model folder or file is missing, incomplete, or not the kind of model expected."""


# ---------------------------------------------------------------------------------------------- prompt encoders


class TextConditioning:
    """The base model's tokenizers and text encoders keyed as the layout keys them (`l` / `h` for SD1.x / SD2.x, `l`
    and `g` for SDXL), with the identity token E_c spliced into each encoder's input embeddings in place of the
    trigger word (DESIGN.md §2.3)."""

    def __init__(self, encoders: dict[str, tuple[object, nn.Module]], trigger_word: str, sdxl: bool) -> None:
        self.encoders = encoders
        self.trigger_word = trigger_word
        self.sdxl = sdxl
        self.trigger_ids: dict[str, int] = {}
        for key, (tokenizer, _) in encoders.items():
            ids = tokenizer(trigger_word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ModelLoadError(
                    f"the trigger word '{trigger_word}' is {len(ids)} tokens for the '{key}' tokenizer; the identity "
                    "token replaces one token, so pick a word that is a single token ('sks' is one in CLIP's vocabulary)"
                )
            self.trigger_ids[key] = ids[0]
        self._warned_truncation = False

    @property
    def keys(self) -> list[str]:
        return list(self.encoders)

    def tokenize(self, captions: list[str], class_words: list[str], with_identity: list[bool]) -> dict[str, torch.Tensor]:
        """(B, max_length) token ids per encoder. With identity, the prompt is the caption + ', <class word> is
        <trigger word>' (`format_identity_prompt`); a prompt too long for the encoder loses the end of its caption,
        never the identity suffix."""
        out = {}
        for key, (tokenizer, _) in self.encoders.items():
            rows = [
                self._tokenize_one(tokenizer, caption, class_word, keep)
                for caption, class_word, keep in zip(captions, class_words, with_identity)
            ]
            out[key] = torch.tensor(rows, dtype=torch.long)
        return out

    def _tokenize_one(self, tokenizer, caption: str, class_word: str, with_identity: bool) -> list[int]:
        length = tokenizer.model_max_length
        prompt = format_identity_prompt(caption, class_word, self.trigger_word) if with_identity else caption
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if len(ids) <= length - 2 or not with_identity:
            return tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        # keep the suffix's tokens (the last ones of the prompt) and as much of the caption as fits before them
        suffix_text = format_identity_prompt("", class_word, self.trigger_word)  # '<class> is <trigger>'
        suffix = len(tokenizer(suffix_text, add_special_tokens=False).input_ids) + 1  # and the comma before it
        if not self._warned_truncation:
            log.warning("a prompt is longer than the text encoder's %d tokens; its caption is cut so that the identity "
                        "suffix stays (%r)", length, prompt)
            self._warned_truncation = True
        kept = ids[: length - 2 - suffix] + ids[-suffix:]
        return [tokenizer.bos_token_id, *kept, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (length - 2 - len(kept))

    def encode(
        self, token_ids: dict[str, torch.Tensor], identity_tokens: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's context (B, L, context_dim) and, for SDXL, the pooled text embeds (B, width of `g`). Rows with
        the trigger token get E_c at its input embedding; others are encoded as they are."""
        hidden, pooled = [], None
        for key, (_, encoder) in self.encoders.items():
            ids = token_ids[key].to(encoder.device)
            trigger = self.trigger_ids[key]
            handle = None
            if identity_tokens is not None and bool((ids == trigger).any()):
                identity = identity_tokens[key]
                handle = encoder.get_input_embeddings().register_forward_hook(
                    lambda module, args, out, identity=identity, trigger=trigger:
                    splice_identity_token(out, args[0], trigger, identity)
                )
            try:
                out = encoder(ids, output_hidden_states=self.sdxl)
            finally:
                if handle is not None:
                    handle.remove()
            if self.sdxl:  # SDXL conditions on the penultimate layer of both encoders, and on the pooled `g`
                hidden.append(out.hidden_states[-2])
                pooled = getattr(out, "text_embeds", pooled)
            else:
                hidden.append(out.last_hidden_state)
        return torch.cat(hidden, dim=-1), pooled

    def modules(self) -> list[nn.Module]:
        return [encoder for _, encoder in self.encoders.values()]


# ---------------------------------------------------------------------------------------------------- base model


@dataclass
class Denoised:
    noisy: torch.Tensor
    prediction: torch.Tensor
    loss: torch.Tensor


@dataclass
class BaseModel:
    unet: nn.Module
    vae: nn.Module
    text: TextConditioning
    noise_scheduler: object
    """A DDPMScheduler with the model's own scheduler config (betas, prediction type)."""
    layout: UNetLayout
    name: str

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    def denoise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> Denoised:
        """The diffusion loss of one training step: the latents noised to `timesteps`, the UNet's prediction (with
        whatever binding is attached) and its MSE against the model's target (ε, or v for v-prediction)."""
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.is_sdxl else None
        dtype = self.unet.dtype
        prediction = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=context.to(dtype),
                               added_cond_kwargs=added).sample
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return Denoised(noisy, prediction, F.mse_loss(prediction.float(), target.float()))


def _read_model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder (no model_index.json); pass the folder that "
                             "holds unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    return json.loads(index.read_text(encoding="utf-8"))


def _has_component(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and entry[0] is not None


def _load_diffusers_folder(folder: Path) -> dict:
    """The components of a diffusers folder, loaded one by one (as IP-Adapter's tutorial_train.py does)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = _read_model_index(folder)
    sdxl = _has_component(index, "text_encoder_2")
    try:
        components = {
            "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True),
            "scheduler_config": json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")),
            "text": [(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
                      CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True))],
        }
        if sdxl:
            components["text"].append((
                CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True),
                CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True),
            ))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the diffusers model in {folder}: {err}") from err
    return components


def _load_single_file(checkpoint: Path, config_folder: Path, original_config: str | None) -> dict:
    """A single-file checkpoint through diffusers' single-file loader, configured from a local diffusers folder of the
    same model type (`config=`), with `local_files_only=True`: nothing is fetched."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not checkpoint.is_file():
        raise ModelLoadError(f"single-file checkpoint not found: {checkpoint}")
    if not config_folder.is_dir():
        raise ModelLoadError(f"--config-folder {config_folder} is not a folder")
    sdxl = _has_component(_read_model_index(config_folder), "text_encoder_2")
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = pipeline_class.from_single_file(
            str(checkpoint), config=str(config_folder), original_config=original_config, local_files_only=True, **extra
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load {checkpoint.name} with the configs in {config_folder}: {err}") from err
    text = [(pipe.tokenizer, pipe.text_encoder)]
    if sdxl:
        text.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return {"unet": pipe.unet, "vae": pipe.vae, "scheduler_config": dict(pipe.scheduler.config), "text": text}


def _encoder_keys(widths: list[int]) -> dict[str, int]:
    """How ComfyUI (and so the presets) key text encoders: one encoder is `h` when it is OpenCLIP ViT-H (1024 wide,
    SD2.x), else `l`; two are `l` and `g` (SDXL)."""
    if len(widths) == 1:
        return {("h" if widths[0] == 1024 else "l"): widths[0]}
    if len(widths) == 2:
        return {"l": widths[0], "g": widths[1]}
    raise ModelLoadError(f"expected one or two text encoders, found {len(widths)}")


def unet_layout(unet: nn.Module, text_widths: dict[str, int], prediction_type: str) -> UNetLayout:
    """The UNet's layout with the scheduler's prediction type (a diffusers UNet config does not carry it, and it tells
    sd21 from sd21-v)."""
    layout = layout_from_diffusers_unet(unet, text_widths=text_widths)
    if layout.prediction != prediction_type:
        preset = match_preset(layout, prediction_type)
        layout = preset if preset is not None and preset.prediction == prediction_type else replace(
            layout, prediction=prediction_type)
    if dict(layout.text_widths) != text_widths:
        raise ModelLoadError(
            f"the UNet is {layout.describe()} (text encoders {dict(layout.text_widths)}), but the model's text encoders "
            f"are {text_widths}; the model folder mixes components of different bases"
        )
    return layout


def load_base_model(config: FitConfig) -> BaseModel:
    """The base model named by --pretrained or --single-file, frozen, in eval mode, on the CPU in float32."""
    from diffusers import DDPMScheduler

    if config.pretrained:
        source = Path(config.pretrained)
        if not source.is_dir():
            raise ModelLoadError(f"--pretrained {source} is not a folder; give a diffusers model folder")
        components = _load_diffusers_folder(source)
    else:
        source = Path(config.single_file)
        components = _load_single_file(source, Path(config.config_folder), config.original_config)
    unet, vae = components["unet"], components["vae"]
    scheduler = DDPMScheduler.from_config(components["scheduler_config"])
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"{source.name} predicts '{scheduler.config.prediction_type}'; the trainer supports "
                             f"{' and '.join(PREDICTION_TYPES)} models (SD1.x, SD2.x, SDXL)")
    text_modules = components["text"]
    keys = _encoder_keys([encoder.config.hidden_size for _, encoder in text_modules])
    layout = unet_layout(unet, keys, scheduler.config.prediction_type)
    text = TextConditioning(dict(zip(keys, text_modules)), config.trigger_word, sdxl=len(text_modules) == 2)
    for module in (unet, vae, *text.modules()):
        module.requires_grad_(False)
        module.eval()
    log.info("base model %s: %s, %s prediction", source.name, layout.describe(), layout.prediction)
    return BaseModel(unet, vae, text, scheduler, layout, source.name)


# ------------------------------------------------------------------------------------------------- CLIP vision


@dataclass
class ClipVision:
    model: nn.Module
    name: str

    @property
    def patch_width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_patches(self) -> int:
        config = self.model.config
        return (int(config.image_size) // int(config.patch_size)) ** 2

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)


def load_clip_vision(path: str | Path, name: str | None = None) -> ClipVision:
    """A transformers CLIPVisionModelWithProjection folder, frozen and in eval mode."""
    from transformers import CLIPVisionModelWithProjection

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"--clip-vision {path} is not a folder; give a transformers CLIPVisionModelWithProjection "
                             "folder (config.json + model.safetensors)")
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the CLIP vision model in {path}: {err}") from err
    model.requires_grad_(False)
    model.eval()
    return ClipVision(model, name or path.name)


# ------------------------------------------------------------------------------------------------ the adapter


def idadapter_config(
    config: FitConfig, layout: UNetLayout, clip: ClipVision, face_dim: int, face_model: str
) -> IDAdapterConfig:
    """The adapter's configuration: MFF input sizes from the CLIP vision model and the cache's face embeddings, widths
    from the settings, and the encoders' names recorded for the weights' metadata."""
    mff = MFFConfig(
        clip_dim=clip.patch_width, face_dim=face_dim, num_patches=clip.num_patches, width=config.mff_width,
        depth=config.mff_depth, heads=config.mff_heads, num_queries=config.mff_num_queries,
    )
    return IDAdapterConfig(
        layout=layout, mff=mff, clip_embed_dim=clip.embed_dim, num_refs=config.num_refs, clip_vision=clip.name,
        face_model=face_model, class_word=config.class_word, trigger_word=config.trigger_word,
    )


# ------------------------------------------------------------------------------------------------ face-ID loss


def build_face_id_loss(config: FitConfig, face_model: str, face_dim: int):
    """The face-ID loss of DESIGN.md §2.5 on the insightface pack the cache was made with: its detector as the gate
    and its recognizer converted to a differentiable torch module (float32, CPU; move it with the run)."""
    from .arcface_torch import ArcFaceTorch
    from .losses import FaceDetectorGate, FaceIDLoss

    analyzer = load_face_analyzer(config.insightface_root, face_model, config.face_provider, config.face_det_size)
    if analyzer.embed_dim != face_dim:
        raise ModelLoadError(
            f"the face model '{face_model}' gives {analyzer.embed_dim}-d embeddings, but the cache holds {face_dim}-d "
            "ones; the face-ID loss must use the recognizer the cache was prepared with"
        )
    recognizer = ArcFaceTorch.from_onnx(analyzer.recognizer.model_file)
    gate = FaceDetectorGate(analyzer, min_face_size=config.face_min_size)
    return FaceIDLoss(recognizer, gate, arcface_size=analyzer.arcface_size)
