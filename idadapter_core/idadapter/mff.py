"""Mixed Facial Features encoder, P_visual (docs/DESIGN.md §2.2).

E_r = P_visual([f_v, f_a]): the CLIP patch tokens of the N references, concatenated along the token
axis (eq. 3), with the mean ArcFace embedding appended (eq. 4), through two attention blocks (eq. 5).
The paper gives the structure only; the widths, the input projections, the type/position embeddings
and pre-LN blocks are our choices (marked [I] in docs/DESIGN.md §2.2) and all are constructor parameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..attention import MultiHeadAttention, Operations


@dataclass(frozen=True)
class MFFConfig:
    clip_dim: int = 1280
    """Width of the CLIP vision patch tokens (1280 for OpenCLIP ViT-H/14)."""
    face_dim: int = 512
    """Width of the face-recognition embedding (512 for ArcFace; 128 for the stand-in recognizer)."""
    num_patches: int = 256
    """Patch tokens per reference image (16x16 for a /14 ViT at 224 px, CLS dropped)."""
    width: int = 1024
    depth: int = 2
    """The paper's 'two attention blocks'."""
    heads: int = 16
    mlp_ratio: int = 4
    num_queries: int = 0
    """0 keeps every input token as E_r (N*num_patches + 1 tokens, as the paper implies); M > 0 appends M
    learned query tokens and keeps only those (a compressed E_r; our option, not the paper's)."""

    def num_ref_tokens(self, num_refs: int) -> int:
        return self.num_queries if self.num_queries else num_refs * self.num_patches + 1

    def to_dict(self) -> dict:
        return asdict(self)


class TransformerBlock(nn.Module):
    """Pre-LN transformer encoder block: x + Attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, operations: Operations = nn) -> None:
        super().__init__()
        self.norm1 = operations.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads, operations)
        self.norm2 = operations.LayerNorm(width)
        self.mlp = nn.Sequential(
            operations.Linear(width, width * mlp_ratio), nn.GELU(), operations.Linear(width * mlp_ratio, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MixedFacialFeatures(nn.Module):
    """(B, N, P, clip_dim) patch tokens + (B, N, face_dim) face embeddings -> E_r (B, T, width), any N >= 1."""

    def __init__(self, config: MFFConfig, operations: Operations = nn) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.patch_proj = operations.Linear(config.clip_dim, width)
        self.face_proj = operations.Linear(config.face_dim, width)
        # Position of a patch inside its image (shared by all N images, so any N works) and a token-type
        # embedding telling patch tokens, the face token and the learned queries apart.
        self.patch_position = nn.Parameter(torch.zeros(config.num_patches, width))
        self.token_type = nn.Parameter(torch.zeros(3, width))
        self.queries = nn.Parameter(torch.randn(config.num_queries, width) * width**-0.5) if config.num_queries else None
        self.blocks = nn.ModuleList(
            TransformerBlock(width, config.heads, config.mlp_ratio, operations) for _ in range(config.depth)
        )
        self.norm_out = operations.LayerNorm(width)
        nn.init.normal_(self.patch_position, std=0.02)
        nn.init.normal_(self.token_type, std=0.02)

    def forward(self, clip_patches: torch.Tensor, face_embeds: torch.Tensor) -> torch.Tensor:
        if clip_patches.ndim != 4 or face_embeds.ndim != 3:
            raise ValueError(
                "expected CLIP patch tokens (batch, refs, patches, width) and face embeddings (batch, refs, width), "
                f"got {tuple(clip_patches.shape)} and {tuple(face_embeds.shape)}"
            )
        batch, num_refs, num_patches, _ = clip_patches.shape
        if num_patches != self.config.num_patches:
            raise ValueError(f"expected {self.config.num_patches} CLIP patch tokens per image, got {num_patches}")
        patches = self.patch_proj(clip_patches)
        # raw parameters follow the activations (ComfyUI may keep them on the offload device)
        token_type = self.token_type.to(patches)
        patches = patches + self.patch_position.to(patches) + token_type[0]
        patches = patches.reshape(batch, num_refs * num_patches, -1)  # f_v = Concat_i f_v(i)   (eq. 3)
        face = self.face_proj(face_embeds.mean(dim=1, keepdim=True)) + token_type[1]  # f_a = mean_i f_a(i) (eq. 4)
        tokens = [patches, face]
        if self.queries is not None:
            tokens.append((self.queries.to(patches) + token_type[2]).expand(batch, -1, -1))
        x = torch.cat(tokens, dim=1)
        for block in self.blocks:
            x = block(x)
        if self.queries is not None:
            x = x[:, -self.config.num_queries :]
        return self.norm_out(x)
