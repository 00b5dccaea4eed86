"""Changes to a training step module that switch one of its paths off (DESIGN.md §2.8, the paper's Table 2, and
Inv-Adapter's two EAA branches), each exact: what was switched off adds exactly nothing. Passed as `adjust` to
`train.fit.TrainingSession`, which applies them before the optimizer is made; bench/identity_learning.py and
bench/identity_generation.py train with them."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from idadapter_core.schedule import adapter_blocks

from .fit import IDAdapterTrainingStep
from .inv_adapter_step import InvAdapterTrainingStep
from .models import TextConditioning


class TriggerWordOwnEmbedding(TextConditioning):
    """Prompts keep ', <class> is <trigger>', but the trigger word keeps its own input embedding: no E_c."""

    def encode(self, token_ids, identity_tokens=None):
        return super().encode(token_ids, None)


def token_only(step_module: IDAdapterTrainingStep) -> None:
    """The paper's "No MFF (no E_r)": every adapter gate stays closed (γ = 0, frozen), so E_r changes nothing."""
    for block in step_module.adapter.blocks:
        block.alpha_attn.requires_grad_(False)
        block.alpha_dense.requires_grad_(False)


def adapter_only(step_module: IDAdapterTrainingStep) -> None:
    """The paper's "No Text Embedding (no E_c)": the identity token is not spliced into the prompt."""
    base = step_module.frozen.base
    base.text = TriggerWordOwnEmbedding(base.text.encoders, base.text.trigger_word, base.text.sdxl)
    step_module.adapter.id_token.requires_grad_(False)


def highest_resolution_blocks(step_module: IDAdapterTrainingStep) -> list[int]:
    """The blocks Apply IDAdapter's faster mode (`blocks = skip highest resolution`) leaves the adapter out of."""
    layout = step_module.frozen.base.layout
    kept = adapter_blocks(layout, "skip highest resolution")
    return [index for index in range(layout.num_blocks) if index not in kept]


def skip_highest_resolution(step_module: IDAdapterTrainingStep) -> None:
    """The faster mode at training: the adapters of the highest-resolution blocks stay closed (γ = 0, frozen), which
    is exactly what leaving them out does; the cross-attention K/V differences train in every block, as the node
    applies them in every block in this mode too."""
    for index in highest_resolution_blocks(step_module):
        block = step_module.adapter.blocks[index]
        block.alpha_attn.requires_grad_(False)
        block.alpha_dense.requires_grad_(False)


@contextmanager
def highest_resolution_skipped(step_module: IDAdapterTrainingStep) -> Iterator[None]:
    """The faster mode at inference on a model trained with every block: those blocks' gates closed meanwhile."""
    gates = [gate for index in highest_resolution_blocks(step_module)
             for gate in (step_module.adapter.blocks[index].alpha_attn, step_module.adapter.blocks[index].alpha_dense)]
    saved = [gate.detach().clone() for gate in gates]
    with torch.no_grad():
        for gate in gates:
            gate.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for gate, value in zip(gates, saved):
                gate.copy_(value)


def self_attention_only(step_module: InvAdapterTrainingStep) -> None:
    """Inv-Adapter without its cross-attention branch: W''_V stays 0 (frozen), so that branch adds an exact 0."""
    for block in step_module.adapter.blocks:
        block.cross_k.requires_grad_(False)
        block.cross_v.requires_grad_(False)


def cross_attention_only(step_module: InvAdapterTrainingStep) -> None:
    """Inv-Adapter without its self-attention branch: the gate stays closed (γ = 0, frozen)."""
    for block in step_module.adapter.blocks:
        for parameter in (block.self_gate, block.self_k.weight, block.self_v.weight):
            parameter.requires_grad_(False)
