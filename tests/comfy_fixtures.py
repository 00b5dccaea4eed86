"""Random-weight models written in ComfyUI's own formats, for the host integration tests (no downloads), and what
several host test modules use: fake face features, ComfyUI's folders pointed at a test tree, a MODEL's weight hash, the refusal of pickled weights."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig, save_idadapter
from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig, save_inv_adapter
from idadapter_core.presets import UNetLayout
from train.fit import weights_digest

# An SD1.5 checkpoint as ComfyUI detects it (model_channels 320, context 768, conv proj_in), but with two UNet
# levels and one res block each: 2 input + 1 middle + 4 output transformer blocks, small enough for CPU tests.
TINY_SD15_UNET = dict(
    image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1, 1], channel_mult=(1, 2),
    num_heads=8, use_spatial_transformer=True, transformer_depth=[1, 1], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1], context_dim=768, use_linear_in_transformer=False,
)
TINY_SD15_LAYOUT = UNetLayout("SD15", (320, 640, 640, 640, 640, 320, 320), (8,) * 7, 768, {"l": 768})
TINY_SD15_DIFFUSERS_UNET = dict(
    layers_per_block=1, block_out_channels=(320, 640), down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=768, attention_head_dim=8,
)
"""The diffusers UNet2DConditionModel of the same shape as TINY_SD15_UNET (`comfy.utils.unet_to_diffusers` maps one
onto the other)."""
SD_VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                       ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
"""SD1.x's KL autoencoder, the one size ComfyUI reads a checkpoint's `first_stage_model.encoder.*` keys as."""
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", clip_sample=False, steps_offset=1)
"""SD1.5's noise schedule, the one ComfyUI gives an SD1.5 checkpoint."""


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Finite random weights for modules built with ComfyUI's disable_weight_init ops (which leave them empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim <= 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def write_tiny_sd15_checkpoint(path: Path, vae: str = "taesd") -> Path:
    """UNet + CLIP-L text encoder + a VAE: a TAESD (small; ComfyUI loads a checkpoint's `taesd_*` VAE keys as TAESD),
    or with vae="kl" SD's own KL autoencoder, which diffusers' single-file loader (the trainer's --single-file) reads
    too, so that the trainer and ComfyUI load the very same file."""
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.sd1_clip import SDClipModel
    from comfy.taesd.taesd import TAESD

    if vae not in ("taesd", "kl"):
        raise ValueError(f"vae must be 'taesd' or 'kl', got {vae!r}")
    ops = comfy.ops.disable_weight_init
    unet = randomize_(UNetModel(**TINY_SD15_UNET, operations=ops), 0)
    clip = randomize_(SDClipModel(), 1)
    autoencoder = TAESD(latent_channels=4) if vae == "taesd" else AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    randomize_(autoencoder, 2)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"cond_stage_model.{k}": v for k, v in clip.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in autoencoder.state_dict().items()})
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items() if v.is_floating_point()}, str(path))
    return path


def write_tiny_sd15_config_folder(folder: Path) -> Path:
    """The local diffusers config folder that diffusers' single-file loader (the trainer's --config-folder) reads a
    `write_tiny_sd15_checkpoint(vae="kl")` file with: the configs of its UNet (TINY_SD15_DIFFUSERS_UNET), VAE, CLIP-L
    text encoder (ComfyUI's sd1_clip_config.json) and scheduler, and ComfyUI's own CLIP tokenizer files (77 tokens,
    as SD1.5's). No weights."""
    import comfy.sd1_clip
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    comfy_dir = Path(comfy.sd1_clip.__file__).parent
    with torch.device("meta"):  # configs only: nothing is allocated
        UNet2DConditionModel(sample_size=32, **TINY_SD15_DIFFUSERS_UNET).save_config(folder / "unet")
        AutoencoderKL(
            block_out_channels=tuple(SD_VAE_DDCONFIG["ch"] * m for m in SD_VAE_DDCONFIG["ch_mult"]),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
            layers_per_block=SD_VAE_DDCONFIG["num_res_blocks"], sample_size=256,
        ).save_config(folder / "vae")
    DDPMScheduler(**SD15_SCHEDULER).save_pretrained(folder / "scheduler")
    text = json.loads((comfy_dir / "sd1_clip_config.json").read_text())
    CLIPTextConfig(**{k: v for k, v in text.items() if k in CLIPTextConfig().to_dict() and k != "model_type"}
                   ).save_pretrained(folder / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(comfy_dir / "sd1_tokenizer", model_max_length=77)
    tokenizer.save_pretrained(folder / "tokenizer")
    components = {"scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                  "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                  "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
                  "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False, **components}, indent=2))
    return folder


def comfy_clip_vision_config(name: str) -> dict:
    """One of ComfyUI's CLIP vision configs (`comfy/clip_vision_config_<name>.json`), as Load CLIP Vision uses it."""
    import comfy.clip_vision

    return json.loads((Path(comfy.clip_vision.__file__).parent / f"clip_vision_config_{name}.json").read_text())


def clip_vision_model(config: dict):
    """ComfyUI's ClipVisionModel of `config`, built the way every release takes it: from a JSON file (a dict is
    accepted from v0.23.0 on only)."""
    import tempfile

    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip_vision_config.json"
        path.write_text(json.dumps(config))
        return comfy.clip_vision.ClipVisionModel(str(path))


def write_clip_vision(path: Path, config: dict, seed: int = 3) -> Path:
    """A random-weight CLIP vision model of `config` in ComfyUI's layout, float16 as the released files are. Load CLIP
    Vision reads such a file when `config` is one of its own (ViT-L/14, `comfy_clip_vision_config("vitl")`, is the
    smallest); `load_clip_vision(path, config)` reads it with any config."""
    model = randomize_(clip_vision_model(config).model, seed)
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_clip_vision(path: Path, config: dict):
    """ComfyUI's ClipVisionModel of `config` with the weights of `path`: what Load CLIP Vision does once it has picked
    the config from the file's keys (`comfy.clip_vision.load_clipvision_from_sd`), for configs it does not know."""
    from safetensors.torch import load_file

    clip_vision = clip_vision_model(config)
    missing, unexpected = clip_vision.load_sd(load_file(str(path)))
    assert not missing and not unexpected, (missing, unexpected)
    return clip_vision


def write_transformers_clip_vision(folder: Path, comfy_file: Path, config: dict) -> Path:
    """The same CLIP vision weights as a transformers CLIPVisionModelWithProjection folder, what the trainer's
    --clip-vision takes. ComfyUI keeps transformers' key names (vision_model.*, visual_projection.weight), so
    the ComfyUI file itself is the folder's model.safetensors (linked); config.json is ComfyUI's config."""
    from transformers import CLIPVisionConfig

    folder.mkdir(parents=True, exist_ok=True)
    known = CLIPVisionConfig().to_dict()
    CLIPVisionConfig(**{k: v for k, v in config.items() if k in known and k != "model_type"}).save_pretrained(folder)
    (folder / "model.safetensors").symlink_to(comfy_file.resolve())
    return folder


def tiny_adapter_config(layout: UNetLayout = TINY_SD15_LAYOUT, face_dim: int = 128, clip_dim: int = 1024,
                        num_patches: int = 256, clip_embed_dim: int = 768) -> IDAdapterConfig:
    return IDAdapterConfig(
        layout=layout,
        mff=MFFConfig(clip_dim=clip_dim, face_dim=face_dim, num_patches=num_patches, width=64, heads=4),
        clip_embed_dim=clip_embed_dim, num_refs=2, clip_vision="ViT-L-14", face_model="standin_scrfd_mbf128",
        class_word="man",
    )


def write_adapter(path: Path, config: IDAdapterConfig, seed: int = 0, open_gates: bool = True, kv_scale: float = 0.0) -> IDAdapter:
    torch.manual_seed(seed)
    adapter = IDAdapter(config)
    with torch.no_grad():
        if open_gates:
            for block in adapter.blocks:
                block.alpha_attn.fill_(0.8)
                block.alpha_dense.fill_(0.5)
        if kv_scale:
            for kv in adapter.cross_kv:
                kv.to_k.diff.normal_(std=kv_scale)
                kv.to_v.diff.normal_(std=kv_scale)
    save_idadapter(path, adapter)
    return adapter


def write_inv_adapter(path: Path, layout: UNetLayout = TINY_SD15_LAYOUT, seed: int = 0, trained: bool = True) -> InvAdapter:
    """Inv-Adapter weights; `trained` opens the self-attention gates and gives the cross branch non-zero values
    (an untrained EAA leaves the UNet unchanged)."""
    torch.manual_seed(seed)
    adapter = InvAdapter(InvAdapterConfig(layout))
    if trained:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for block in adapter.blocks:
                block.self_gate.fill_(0.7)
                block.cross_v.weight.copy_(torch.randn(block.cross_v.weight.shape, generator=g) * 0.05)
    save_inv_adapter(path, adapter)
    return adapter


def comfy_model_tree(root: Path, method_folder: str):
    """Point ComfyUI's checkpoints, `method_folder` and output folders at `root` (inside a host test, after the pack
    is imported); write the tiny SD1.5 checkpoint there and load it. Returns (MODEL, CLIP, VAE)."""
    import comfy.sd
    import folder_paths

    for folder in ("checkpoints", method_folder):
        (root / folder).mkdir()
        folder_paths.add_model_folder_path(folder, str(root / folder), is_default=True)
    folder_paths.set_output_directory(str(root / "output"))
    checkpoint = write_tiny_sd15_checkpoint(root / "checkpoints" / "tiny-sd15.safetensors")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), embedding_directory=None)
    return model, clip, vae


def diffusers_twin(comfy_unet, unet_config: dict, **config):
    """A diffusers UNet2DConditionModel (two cross-attention levels) holding the ComfyUI UNet's weights."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    twin = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **config,
    ).eval()
    comfy_sd = comfy_unet.state_dict()
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    missing, unexpected = twin.load_state_dict({d: comfy_sd[c] for d, c in mapping.items() if c in comfy_sd}, strict=False)
    assert not missing and not unexpected
    return twin


def fake_features(config: IDAdapterConfig, seed: int = 0):
    """Face features of the right shapes for Encode Identity (the face pipeline itself is tested in test_face*)."""
    g = torch.Generator().manual_seed(seed)
    n, mff = config.num_refs, config.mff

    class Features:
        clip_patches = torch.randn(n, mff.num_patches, mff.clip_dim, generator=g)
        face_embeds = torch.nn.functional.normalize(torch.randn(n, mff.face_dim, generator=g), dim=-1)
        clip_image_embeds = torch.randn(n, config.clip_embed_dim, generator=g)

    return Features


@contextmanager
def comfy_folders(input_directory: Path, **model_folders: Path):
    """ComfyUI's input folder set to `input_directory` (restored afterwards) and `model_folders` registered first in
    their lists (Load Checkpoint, Load IDAdapter, Load InsightFace find their files there)."""
    import folder_paths

    for kind, folder in model_folders.items():
        folder_paths.add_model_folder_path(kind, str(folder), is_default=True)
    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(input_directory))
    try:
        yield
    finally:
        folder_paths.set_input_directory(previous)


def model_hash(model) -> str:
    """The trainer's `weights_digest` of a MODEL's (ModelPatcher's) weights: equal before and after means untouched."""
    return weights_digest(model.model)


def check_pickled_weights_are_listed_and_refused(folder: Path, name: str, load: Callable[[str], object], reason: str) -> None:
    """A PyTorch checkpoint `name` saved in the weights `folder` (registered in ComfyUI under its folder name) is listed,
    so that picking it says why it does not load: `load(name)` fails matching `reason`."""
    import folder_paths

    torch.save({"w": torch.zeros(2)}, folder / name)
    assert name in folder_paths.get_filename_list(folder.name)
    with pytest.raises(Exception, match=reason):
        load(name)
