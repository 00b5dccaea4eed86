"""Random-weight models written in ComfyUI's own formats, for the host integration tests (no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig, save_idadapter
from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig, save_inv_adapter
from idadapter_core.presets import UNetLayout

# An SD1.5 checkpoint as ComfyUI detects it (model_channels 320, context 768, conv proj_in), but with two UNet
# levels and one res block each: 2 input + 1 middle + 4 output transformer blocks, small enough for CPU tests.
TINY_SD15_UNET = dict(
    image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1, 1], channel_mult=(1, 2),
    num_heads=8, use_spatial_transformer=True, transformer_depth=[1, 1], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1], context_dim=768, use_linear_in_transformer=False,
)
TINY_SD15_LAYOUT = UNetLayout("SD15", (320, 640, 640, 640, 640, 320, 320), (8,) * 7, 768, {"l": 768})


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


def write_tiny_sd15_checkpoint(path: Path) -> Path:
    """UNet + CLIP-L text encoder + a TAESD as the VAE (ComfyUI loads a checkpoint's `taesd_*` VAE keys as TAESD)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.sd1_clip import SDClipModel
    from comfy.taesd.taesd import TAESD

    ops = comfy.ops.disable_weight_init
    unet = randomize_(UNetModel(**TINY_SD15_UNET, operations=ops), 0)
    clip = randomize_(SDClipModel(), 1)
    vae = randomize_(TAESD(latent_channels=4), 2)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"cond_stage_model.{k}": v for k, v in clip.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items() if v.is_floating_point()}, str(path))
    return path


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
