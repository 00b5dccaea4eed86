"""IDAdapter (Cui et al., arXiv 2403.13535): Mixed Facial Features -> reference tokens E_r for a gated self-attention
adapter in every UNet transformer block, and an identity token E_c for the prompt (docs/DESIGN.md §2).

    mff.py       MixedFacialFeatures, P_visual (§3.3, eqs. 3-5)
    id_token.py  IdentityTokenMLP, P_textual, and the prompt template (§3.4, eq. 6)
    adapter.py   GatedSelfAttention per block and the cross-attention K/V deltas (§3.4, eq. 7, App. A)
    model.py     IDAdapter: all of the above as one module, its config and its output (IdentityEmbeds)
    files.py     the adapter weights file and the saved-identity file
"""
from .adapter import CrossAttentionKV, GatedSelfAttention, IDAdapterBlocks, ReferenceKV, WeightDelta
from .files import load_idadapter, load_identity_embeds, save_idadapter, save_identity_embeds
from .id_token import IdentityTokenMLP, format_identity_prompt, splice_identity_token
from .mff import MFFConfig, MixedFacialFeatures
from .model import IDAdapter, IDAdapterConfig, IdentityEmbeds, count_trainable_parameters

__all__ = [
    "CrossAttentionKV", "GatedSelfAttention", "IDAdapterBlocks", "ReferenceKV", "WeightDelta",
    "load_idadapter", "load_identity_embeds", "save_idadapter", "save_identity_embeds",
    "IdentityTokenMLP", "format_identity_prompt", "splice_identity_token",
    "MFFConfig", "MixedFacialFeatures",
    "IDAdapter", "IDAdapterConfig", "IdentityEmbeds", "count_trainable_parameters",
]
