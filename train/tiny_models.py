"""Tiny diffusion and CLIP vision model folders built in code, for the demo and the tests: nothing is downloaded, and
each loads through the same local-folder code paths as the real models (`train.models`).

- `write_tiny_pipeline`: a diffusers folder shaped like SD1.5 (one 32-wide text encoder, ε), SD2.1-v (v-prediction)
  or SDXL (text encoders 32 + 48 wide keyed l and g, pooled embeds, add_time_ids), with a CLIP tokenizer built from a
  tiny byte-level BPE vocabulary in which 'sks', the class words and a few caption words are single tokens.
- `write_tiny_clip_vision`: a CLIPVisionModelWithProjection folder (32 px input, 16 patches of width 16, embeds 12).

Random weights: what they generate is noise; they exercise the plumbing, not the quality.
"""
from __future__ import annotations

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


def _text_encoder(tokenizer, width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def write_tiny_pipeline(folder: Path, kind: str = "sd15", seed: int = 0) -> Path:
    """A diffusers model folder with random weights seeded by `seed`; kind: 'sd15' (ε), 'v' (v-prediction) or
    'sdxl'."""
    from diffusers import (
        AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=RESOLUTION,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1,
                              prediction_type="v_prediction" if kind == "v" else "epsilon")
    if kind == "sdxl":
        text_l, text_g = _text_encoder(tokenizer, 32, False), _text_encoder(tokenizer, 48, True)
        unet = UNet2DConditionModel(**{
            **tiny_unet_config(cross_attention_dim=32 + 48), "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 48 + 6 * 8,
        })
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_l, text_encoder_2=text_g, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=32))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(tokenizer, 32, False), tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def write_tiny_clip_vision(folder: Path, seed: int = 0) -> Path:
    """A transformers CLIPVisionModelWithProjection folder with random weights seeded by `seed`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=12,
    ))
    model.save_pretrained(folder)
    return folder
