"""What every method's diffusers binding needs from a `UNet2DConditionModel`: its transformer blocks in forward order
and its layout. Duck-typed on diffusers' module layout, so importing it needs no diffusers."""
from __future__ import annotations

from torch import nn

from ..errors import IncompatibleWeightsError
from ..presets import UNetLayout, identify_layout


def transformer_blocks_in_forward_order(unet: nn.Module) -> list[nn.Module]:
    """Every BasicTransformerBlock in the order the UNet runs them: down blocks, middle block, up blocks."""
    stages = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    blocks = []
    for stage in stages:
        for transformer in getattr(stage, "attentions", None) or []:
            blocks.extend(transformer.transformer_blocks)
    return blocks


def layout_from_diffusers_unet(unet: nn.Module, text_widths: dict[str, int] | None = None) -> UNetLayout:
    """The UNet's layout: the preset it matches (sd21 vs sd21-v told apart by the UNet config's prediction type),
    else 'custom'."""
    blocks = transformer_blocks_in_forward_order(unet)
    if not blocks:
        raise IncompatibleWeightsError("this UNet has no transformer blocks to attach an adapter to")
    return identify_layout(
        tuple(block.attn1.to_q.in_features for block in blocks),
        tuple(block.attn1.heads for block in blocks),
        blocks[0].attn2.to_k.in_features,
        prediction=getattr(getattr(unet, "config", None), "prediction_type", None),
        text_widths=text_widths,
    )
