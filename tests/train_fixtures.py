"""Tiny local model folders and a tiny prepared cache for the trainer's tests: nothing is downloaded.

- `write_tiny_pipeline`: a diffusers folder like SD1.5 (one 32-wide text encoder, ε), SD2.1-v (v-prediction) or
  SDXL (text encoders 32 + 48 wide keyed l and g, pooled embeds, add_time_ids), with a CLIP tokenizer built from a
  tiny byte-level BPE vocabulary in which 'sks', the class words and the caption words are single tokens.
- `write_tiny_clip_vision`: a CLIPVisionModelWithProjection folder (32 px input, 16 patches of width 16, embeds 12).
- `write_tiny_cache`: identities of red-square "faces" (tests/face_models.py) through `train.prepare`'s own code with
  the tiny insightface pack: alice 3 images, bob 2, carol 1, 2 augmented copies each.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from conftest import tiny_unet_config
from face_models import square_faces_image, write_model_pack

WORDS = ("sks", "person", "man", "woman", "photo", "portrait", "of", "a", "is", "smiling", "outdoors")
MAX_TOKENS = 16
FACE_PACK = "tiny_pack"
FACE_DIM = 64
RESOLUTION = 16
"""Target images are 16 px: latents of 8x8 with the 2-level tiny VAE."""


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


def tiny_clip_tokenizer(words=WORDS, max_length: int = MAX_TOKENS):
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
    """kind: 'sd15' (ε), 'v' (v-prediction) or 'sdxl'."""
    from diffusers import (
        AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=RESOLUTION,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
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
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=12,
    ))
    model.save_pretrained(folder)
    return folder


IDENTITIES = {"alice": 3, "bob": 2, "carol": 1}


def write_tiny_cache(root: Path) -> tuple[Path, Path]:
    """(insightface root, cache folder): the tiny face pack, and a cache prepared from red-square identities with
    captions, 2 augmented copies per image."""
    from idadapter_core.face import load_face_analyzer
    from train.prepare import prepare_dataset

    pack_root = root / "insightface"
    write_model_pack(pack_root, FACE_PACK, embed_dim=FACE_DIM)
    source = root / "identities"
    seed = 0
    for identity, count in IDENTITIES.items():
        (source / identity).mkdir(parents=True)
        for i in range(count):
            seed += 1
            path = source / identity / f"{i}.png"
            Image.fromarray(square_faces_image((320, 320), [(160, 160, 128)], seed=seed)).save(path)
            path.with_suffix(".txt").write_text(f"a portrait photo of a {'woman' if i % 2 else 'man'} smiling outdoors")
    analyzer = load_face_analyzer(pack_root, FACE_PACK, "CPU", det_size=320)
    cache = root / "cache"
    prepare_dataset(source, cache, analyzer, min_images=1, augmentations=2)
    return pack_root, cache
