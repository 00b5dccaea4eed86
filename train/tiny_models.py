"""Tiny diffusion and CLIP vision model folders built in code, for the demo, the benchmarks and the tests: nothing is
downloaded, and each loads through the same local-folder code paths as the real models (`train.models`).

- `write_tiny_pipeline`: a diffusers folder shaped like SD1.5 (one 32-wide text encoder, ε), SD2.1-v (v-prediction)
  or SDXL (text encoders 32 + 48 wide keyed l and g, pooled embeds, add_time_ids), with a CLIP tokenizer built from a
  tiny byte-level BPE vocabulary in which 'sks', the class words and a few caption words are single tokens.
- `write_tiny_clip_vision`: a CLIPVisionModelWithProjection folder (32 px input, 16 patches of width 16, embeds 12).
- `ModelSpec`: the constructor arguments of an SD1.x-like base model's parts and of a CLIP vision model;
  `TINY_SPEC` (32 px, the identity benchmarks'), `ModelSpec.scaled` (a real layout with every width and the
  resolution scaled, the FLOP shares kept: the throughput benchmark's). `build_base_components` makes the parts
  with random weights, `save_base_model` writes them as a diffusers folder, `write_clip_vision` a CLIP vision one.

Random weights: what they generate is noise; they exercise the plumbing, not the quality (train/pretrain.py trains
a base on a synthetic world where a benchmark needs one that draws something).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

WORDS = ("sks", "person", "man", "woman", "photo", "portrait", "of", "a", "is", "smiling", "outdoors")
"""Single tokens of the tiny tokenizer (every other word is spelled byte by byte)."""
MAX_TOKENS = 16
RESOLUTION = 16
"""The tiny VAE's nominal image size (its latents are half as wide: 2 levels)."""


def tiny_unet_config(cross_attention_dim: int = 24) -> dict:
    """Two attention levels (the second with two transformer layers), so forward order has depth inside blocks."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_clip_tokenizer(words: tuple[str, ...] = WORDS, max_length: int = MAX_TOKENS):
    """A CLIPTokenizer over every byte plus merges that make each of `words` one token ('sks</w>', ...)."""
    from transformers import CLIPTokenizer

    chars = sorted(set(_bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def text_encoder(tokenizer, max_tokens: int = MAX_TOKENS, projection: bool = False, **config):
    """A random-weight CLIP text encoder over `tokenizer`'s vocabulary; `config`: CLIPTextConfig's sizes (and, to
    override the tokenizer's, `vocab_size`: CLIP's own table has 49,408 rows)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**{
        "vocab_size": len(tokenizer), "max_position_embeddings": max_tokens, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **config,
    })
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_text_encoder(tokenizer, width: int, projection: bool):
    return text_encoder(tokenizer, projection=projection, hidden_size=width, intermediate_size=2 * width,
                        num_hidden_layers=2, num_attention_heads=4, projection_dim=width)


def sd_scheduler(prediction_type: str = "epsilon"):
    """SD1.x's training noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         steps_offset=1, prediction_type=prediction_type)


def write_tiny_pipeline(folder: Path, kind: str = "sd15", seed: int = 0) -> Path:
    """A diffusers model folder with random weights seeded by `seed`; kind: 'sd15' (ε), 'v' (v-prediction) or
    'sdxl'."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=RESOLUTION,
    )
    scheduler = sd_scheduler("v_prediction" if kind == "v" else "epsilon")
    if kind == "sdxl":
        text_l, text_g = _tiny_text_encoder(tokenizer, 32, False), _tiny_text_encoder(tokenizer, 48, True)
        unet = UNet2DConditionModel(**{
            **tiny_unet_config(cross_attention_dim=32 + 48), "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 48 + 6 * 8,
        })
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_l, text_encoder_2=text_g, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=32))
        pipe = sd_pipeline(vae, _tiny_text_encoder(tokenizer, 32, False), tokenizer, unet, scheduler)
    pipe.save_pretrained(folder)
    return folder


TINY_CLIP_VISION = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, projection_dim=12)


def write_tiny_clip_vision(folder: Path, seed: int = 0) -> Path:
    """A transformers CLIPVisionModelWithProjection folder with random weights seeded by `seed`."""
    return write_clip_vision(folder, TINY_CLIP_VISION, seed)


def build_clip_vision(config: dict, seed: int = 0):
    """A CLIPVisionModelWithProjection of CLIPVisionConfig(**config), random weights seeded by `seed`, in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval()


def write_clip_vision(folder: Path, config: dict, seed: int) -> Path:
    """`build_clip_vision(config, seed)` saved as a folder."""
    build_clip_vision(config, seed).save_pretrained(folder)
    return folder


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ---- specs of SD1.x-like base models: tiny ones, and real layouts scaled ------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """Constructor arguments of the base model's parts and of the CLIP vision model."""

    unet: dict
    """diffusers UNet2DConditionModel kwargs (sample_size and cross_attention_dim are set from the others)."""
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

    def scaled(self, width: float, resolution: float) -> "ModelSpec":
        """Every width x `width`, the resolution x `resolution` and every token count with it (text tokens and
        CLIP patches x resolution²): with resolution² = width, every linear layer and convolution (FLOPs ~ width² x
        tokens) and every attention (~ tokens² x width) shrinks by the same factor, so the FLOP shares of the parts
        stay those of this spec. Heads keep their width (their number scales); GroupNorm keeps its groups where the
        scaled widths allow (fewer otherwise: no FLOPs either way). Text tokens are kept at 16 or more (a prompt with
        the identity suffix needs 11), which only tiny scales reach."""
        heads = lambda count: max(1, round(count * width))
        channels = lambda values: tuple(round(v * width) for v in values)
        groups = lambda config, scaled: math.gcd(config.get("norm_num_groups", 32), *scaled)
        unet_channels, vae_channels = channels(self.unet["block_out_channels"]), channels(self.vae["block_out_channels"])

        def transformer(config: dict) -> dict:
            hidden = round(config["hidden_size"] * width)
            return dict(config, hidden_size=hidden, num_attention_heads=heads(config["num_attention_heads"]),
                        intermediate_size=hidden * (config["intermediate_size"] // config["hidden_size"]))

        return replace(
            self,
            unet=dict(self.unet, block_out_channels=unet_channels, norm_num_groups=groups(self.unet, unet_channels),
                      attention_head_dim=heads(self.unet["attention_head_dim"])),  # diffusers' SD1.x name for heads
            vae=dict(self.vae, block_out_channels=vae_channels, norm_num_groups=groups(self.vae, vae_channels)),
            text=transformer(self.text),
            clip_vision=dict(transformer(self.clip_vision),
                             image_size=round(self.clip_vision["image_size"] * resolution),
                             projection_dim=round(self.clip_vision["projection_dim"] * width)),
            resolution=round(self.resolution * resolution),
            text_tokens=max(16, round(self.text_tokens * resolution**2)),
        )


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


def build_base_components(spec: ModelSpec, seed: int, words: tuple[str, ...] = WORDS,
                          device: torch.device | str | None = None) -> BaseComponents:
    """Random-weight SD1.x-style parts (on `device`: 'meta' allocates nothing), the tokenizer knowing `words`. The
    VAE's posterior is made near-deterministic (log-variance -20, as a trained VAE's is small), so a target's latent
    is its image's encoding, not noise."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(words, max_length=spec.text_tokens)
    with torch.device(device) if device is not None else nullcontext():
        text = text_encoder(tokenizer, spec.text_tokens, **spec.text)
        vae = AutoencoderKL(**{**spec.vae, "sample_size": spec.resolution})
        latent = vae.config.latent_channels
        with torch.no_grad():
            vae.quant_conv.weight[latent:] = 0.0
            vae.quant_conv.bias[latent:] = -20.0
        unet = UNet2DConditionModel(**{**spec.unet, "sample_size": spec.resolution // vae_downsampling(spec),
                                       "cross_attention_dim": spec.text["hidden_size"]})
    return BaseComponents(tokenizer, text.eval(), vae.eval(), unet, sd_scheduler())


def vae_downsampling(spec: ModelSpec) -> int:
    return 2 ** (len(spec.vae["block_out_channels"]) - 1)


def save_base_model(parts: BaseComponents, folder: Path) -> Path:
    sd_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.unet, parts.scheduler).save_pretrained(folder)
    return folder
