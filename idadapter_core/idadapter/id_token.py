"""Identity token, P_textual (docs/DESIGN.md §2.3).

E_c = P_textual(mean_i f_c(i)) replaces the input embedding of the trigger word ("sks") before the text
transformer, in a prompt extended with ", <class word> is <trigger word>". The paper says "a multi-layer
perceptron"; LN -> Linear -> GELU -> Linear is our choice. SDXL has two text encoders, so there is one
output head per encoder key (`l`, `h`, `g`, as ComfyUI keys them).
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import Operations


class IdentityTokenMLP(nn.Module):
    def __init__(
        self, clip_embed_dim: int, text_widths: dict[str, int], hidden_dim: int | None = None, operations: Operations = nn
    ) -> None:
        super().__init__()
        if not text_widths:
            raise ValueError("text_widths must name at least one text encoder")
        hidden_dim = hidden_dim or clip_embed_dim
        self.trunk = nn.Sequential(
            operations.LayerNorm(clip_embed_dim), operations.Linear(clip_embed_dim, hidden_dim), nn.GELU()
        )
        self.heads = nn.ModuleDict({key: operations.Linear(hidden_dim, width) for key, width in sorted(text_widths.items())})

    def forward(self, clip_image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, N, clip_embed_dim) image embeddings of the N references -> {encoder key: (B, width)}."""
        hidden = self.trunk(clip_image_embeds.mean(dim=1))
        return {key: head(hidden) for key, head in self.heads.items()}


def format_identity_prompt(text: str, class_word: str, trigger_word: str) -> str:
    """The paper's template: '[class noun] is sks' appended to the end of every prompt."""
    text = text.rstrip().rstrip(",")
    suffix = f"{class_word} is {trigger_word}"
    return f"{text}, {suffix}" if text else suffix


def splice_identity_token(
    input_embeds: torch.Tensor, token_ids: torch.Tensor, trigger_id: int, identity_embed: torch.Tensor
) -> torch.Tensor:
    """Replace the input embedding of every trigger token by E_c (B, width); returns a new tensor."""
    mask = (token_ids == trigger_id).unsqueeze(-1)
    if not bool(mask.any()):
        raise ValueError(f"the prompt has no trigger token (id {trigger_id}) to replace")
    return torch.where(mask, identity_embed[:, None, :].to(input_embeds.dtype), input_embeds)
