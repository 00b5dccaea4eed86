"""Host bindings outside ComfyUI (ComfyUI's own lives in `nodes/`: `comfy_binding.py` shared by the methods, one
`*_binding.py` per method). Each is duck-typed on its host's module layout, so importing it needs neither diffusers
nor transformers.

    diffusers_unet.py       shared by every method: a diffusers UNet's transformer blocks and layout
    diffusers_idadapter.py  IDAdapter attached to a diffusers UNet (the trainer's host, the parity reference)
    diffusers_inv_adapter.py  Inv-Adapter attached to a diffusers UNet (processors), and a UNet as a denoiser
    transformers_clip.py    a transformers CLIP vision model as the face features' CLIP encoder
"""
from .diffusers_idadapter import DiffusersIDAdapter
from .diffusers_inv_adapter import DiffusersInvAdapter, diffusers_denoiser
from .diffusers_unet import layout_from_diffusers_unet, transformer_blocks_in_forward_order
from .transformers_clip import clip_encoder_from_transformers

__all__ = [
    "DiffusersIDAdapter", "DiffusersInvAdapter", "diffusers_denoiser", "layout_from_diffusers_unet", "transformer_blocks_in_forward_order",
    "clip_encoder_from_transformers",
]
