"""Host-agnostic IDAdapter / Inv-Adapter math: pure torch, no ComfyUI or diffusers imports."""
from .adapter import GatedSelfAttention, IDAdapterBlocks, ReferenceKV
from .errors import IDAdapterError, IncompatibleWeightsError, WeightsFormatError
from .id_token import IdentityTokenMLP, format_identity_prompt, splice_identity_token
from .mff import MFFConfig, MixedFacialFeatures
from .model import IDAdapter, IDAdapterConfig, IdentityEmbeds, count_trainable_parameters
from .presets import PRESETS, UNetLayout, get_preset
from .weights import load_identity_embeds, load_idadapter, save_identity_embeds, save_idadapter

__all__ = [
    "GatedSelfAttention", "IDAdapterBlocks", "ReferenceKV",
    "IDAdapterError", "IncompatibleWeightsError", "WeightsFormatError",
    "IdentityTokenMLP", "format_identity_prompt", "splice_identity_token",
    "MFFConfig", "MixedFacialFeatures",
    "IDAdapter", "IDAdapterConfig", "IdentityEmbeds", "count_trainable_parameters",
    "PRESETS", "UNetLayout", "get_preset",
    "load_idadapter", "save_idadapter", "load_identity_embeds", "save_identity_embeds",
]
