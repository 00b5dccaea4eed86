"""IDAdapter as one module: MFF encoder, identity-token MLP, per-block adapters and cross-attention K/V deltas."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..attention import Operations
from ..errors import IncompatibleWeightsError
from ..presets import UNetLayout, get_preset
from .adapter import CrossAttentionKV, IDAdapterBlocks
from .id_token import IdentityTokenMLP
from .mff import MFFConfig, MixedFacialFeatures


@dataclass(frozen=True)
class IDAdapterConfig:
    layout: UNetLayout
    mff: MFFConfig = field(default_factory=MFFConfig)
    clip_embed_dim: int = 1024
    """Width of the CLIP image embedding f_c (1024 for OpenCLIP ViT-H/14)."""
    num_refs: int = 4
    """N of the paper (Table 2: 4 is best); at inference fewer images are filled up to N."""
    clip_vision: str = "ViT-H-14"
    face_model: str = "antelopev2"
    class_word: str = "person"
    trigger_word: str = "sks"
    train_cross_kv: bool = True

    @property
    def num_ref_tokens(self) -> int:
        return self.mff.num_ref_tokens(self.num_refs)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "IDAdapterConfig":
        data = json.loads(text)
        layout = UNetLayout.from_json(json.dumps(data.pop("layout")))
        mff = MFFConfig(**data.pop("mff"))
        return cls(layout=layout, mff=mff, **data)

    @classmethod
    def for_base(cls, base: str, **overrides) -> "IDAdapterConfig":
        return cls(layout=get_preset(base), **overrides)

    def check_features(self, clip_patches: torch.Tensor, face_embeds: torch.Tensor, clip_image_embeds: torch.Tensor) -> None:
        """Refuse face features made with other face or CLIP models than these weights were trained with."""
        mff = self.mff
        if face_embeds.shape[-1] != mff.face_dim:
            raise IncompatibleWeightsError(
                f"the face embeddings are {face_embeds.shape[-1]}-d, but these weights were trained on {mff.face_dim}-d "
                f"embeddings from '{self.face_model}'; load that model in Load InsightFace."
            )
        if clip_patches.shape[-1] != mff.clip_dim or clip_patches.shape[-2] != mff.num_patches or clip_image_embeds.shape[-1] != self.clip_embed_dim:
            raise IncompatibleWeightsError(
                f"the CLIP vision features ({clip_patches.shape[-2]} patch tokens x {clip_patches.shape[-1]}, image embeds "
                f"{clip_image_embeds.shape[-1]}) do not fit these weights ({mff.num_patches} x {mff.clip_dim}, "
                f"{self.clip_embed_dim}); load '{self.clip_vision}' in Load CLIP Vision."
            )


@dataclass
class IdentityEmbeds:
    """What Encode Identity produces: E_r (B, T, D) for the adapters and E_c per text encoder, tagged with
    the weights that made them (E_r only means something to the adapters trained with that MFF)."""

    reference_tokens: torch.Tensor
    identity_tokens: dict[str, torch.Tensor]
    adapter_fingerprint: str = ""
    adapter_name: str = ""

    def check_made_by(self, fingerprint: str, name: str) -> None:
        if self.adapter_fingerprint and self.adapter_fingerprint != fingerprint:
            raise IncompatibleWeightsError(
                f"these ID embeds were encoded with '{self.adapter_name}', not with '{name}'; "
                "run Encode Identity with the same IDAdapter weights you apply."
            )


class IDAdapter(nn.Module):
    def __init__(self, config: IDAdapterConfig, operations: Operations = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        layout = config.layout
        self.mff = MixedFacialFeatures(config.mff, operations)
        self.id_token = IdentityTokenMLP(config.clip_embed_dim, layout.text_widths, operations=operations)
        self.blocks = IDAdapterBlocks(layout, config.mff.width, operations, device=device, dtype=dtype)
        self.cross_kv = nn.ModuleList(
            CrossAttentionKV(channels, layout.context_dim, device=device, dtype=dtype) for channels in layout.block_channels
        ) if config.train_cross_kv else nn.ModuleList()
        if device is not None or dtype is not None:
            self.mff.to(device=device, dtype=dtype)
            self.id_token.to(device=device, dtype=dtype)

    def encode(self, clip_patches: torch.Tensor, face_embeds: torch.Tensor, clip_image_embeds: torch.Tensor) -> IdentityEmbeds:
        """(B, N, P, clip_dim), (B, N, face_dim), (B, N, clip_embed_dim) -> E_r and E_c."""
        self.config.check_features(clip_patches, face_embeds, clip_image_embeds)
        return IdentityEmbeds(self.mff(clip_patches, face_embeds), self.id_token(clip_image_embeds))


def count_trainable_parameters(config: IDAdapterConfig) -> dict[str, int]:
    """Parameter counts per part, computed on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = IDAdapter(config)
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("mff", "id_token", "blocks", "cross_kv")}
    counts["total"] = sum(counts.values())
    return counts
