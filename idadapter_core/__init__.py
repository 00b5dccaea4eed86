"""Host-agnostic identity adapters: pure torch, no ComfyUI or diffusers imports (docs/DESIGN.md §4).

Shared by every method:
    errors.py     the exception types
    attention.py  the attention-kernel signature, SDPA, MultiHeadAttention
    presets.py    UNet layouts (transformer blocks in forward order), matching a UNet to a base, checking weights
    weights.py    the safetensors container: atomic writes, refusing what is not a weights file
    masks.py      region masks at each transformer block's token grid (several people in one image)
    face/         insightface detection, alignment, ArcFace + CLIP features, ID similarity
    hosts/        diffusers / transformers bindings
One package per method:
    idadapter/    IDAdapter (arXiv 2403.13535)
    inv_adapter/  Inv-Adapter (arXiv 2406.02881)
"""
from .errors import IDAdapterError, IncompatibleWeightsError, WeightsFormatError
from .hosts import (
    DiffusersIDAdapter, clip_encoder_from_transformers, layout_from_diffusers_unet, transformer_blocks_in_forward_order,
)
from .idadapter import (
    GatedSelfAttention, IDAdapter, IDAdapterBlocks, IDAdapterConfig, IdentityEmbeds, IdentityTokenMLP, MFFConfig,
    MixedFacialFeatures, ReferenceKV, count_trainable_parameters, format_identity_prompt, load_idadapter,
    load_identity_embeds, save_idadapter, save_identity_embeds, splice_identity_token,
)
from .presets import PRESETS, UNetLayout, check_layout, get_preset, identify_layout, match_preset

__all__ = [
    "IDAdapterError", "IncompatibleWeightsError", "WeightsFormatError",
    "DiffusersIDAdapter", "clip_encoder_from_transformers", "layout_from_diffusers_unet",
    "transformer_blocks_in_forward_order",
    "GatedSelfAttention", "IDAdapterBlocks", "ReferenceKV",
    "IdentityTokenMLP", "format_identity_prompt", "splice_identity_token",
    "MFFConfig", "MixedFacialFeatures",
    "IDAdapter", "IDAdapterConfig", "IdentityEmbeds", "count_trainable_parameters",
    "PRESETS", "UNetLayout", "check_layout", "get_preset", "identify_layout", "match_preset",
    "load_idadapter", "save_idadapter", "load_identity_embeds", "save_identity_embeds",
]
