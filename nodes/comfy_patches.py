"""Attention patch plumbing that every method's ComfyUI binding shares (docs/DESIGN.md §4.3).

ComfyUI keeps one replace patch per transformer block and attention (`patches_replace["attn1"|"attn2"][key]`,
comfy/ldm/modules/attention.py `BasicTransformerBlock.forward`): setting one drops whatever another pack (or an
earlier Apply) put there. `set_attention_replace` never drops it: the new patch gets the previous one (or ComfyUI's
own attention) as `inner` and decides what to hand on. ComfyUI runs a replace patch with the keys and values
already projected; a patch that needs what was projected (the text context, for a change of W_K / W_V) reads it
from `attention_inputs`, recorded by an `attn1_patch` / `attn2_patch` that `record_attention_inputs` installs.
With every patch passing its inputs through unchanged, the block computes exactly what it computes without them.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from comfy.ldm.modules.attention import optimized_attention

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
"""A replace patch as ComfyUI calls it: (q, k, v, extra_options) -> the attention's output before `to_out`."""

ATTENTION_INPUTS = "attention_inputs"
"""The key in a block's `extra_options` under which recorded inputs are kept, per attention ("attn1"/"attn2")."""


class ReplacePatch(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict,
                 inner: Attention) -> torch.Tensor: ...


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """What `CrossAttention.forward` runs when no replace patch is set: the same kernel with the same arguments
    (`extra_options` holds the block's transformer_options, attention overrides included), so handing inputs on
    unchanged gives the unpatched block's output bit for bit."""
    return optimized_attention(
        q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
        transformer_options=extra_options,
    )


class SharedPatch:
    """A patch object that every clone of a MODEL shares. ComfyUI copies `model_options` at each clone: shallowly from
    v0.14.0 on, with copy.deepcopy before ("mp: dont deep-clone objects from model_options"), which would copy the
    adapter's weights with every clone (and fails on tensors that are not graph leaves). Deep-copying one returns it,
    so every release shares it as v0.14.0 and later do."""

    def __deepcopy__(self, memo: dict) -> "SharedPatch":
        return self


def _forward(target: object, method: str, *args) -> list:
    function = getattr(target, method, None)
    return function(*args) if callable(function) else []


class ChainedReplace(SharedPatch):
    """One `patches_replace` entry: `patch` with the entry it replaced as its `inner`. Carries ComfyUI's
    patch-object protocol (`.to`, `.models`, `.cleanup`) to both, so the replaced entry's weights still load."""

    def __init__(self, patch: ReplacePatch, inner: Attention) -> None:
        self.patch = patch
        self.inner = inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        return self.patch(q, k, v, extra_options, self.inner)

    def to(self, device_or_dtype) -> "ChainedReplace":
        for name in ("patch", "inner"):
            part = getattr(self, name)
            if callable(getattr(part, "to", None)):
                setattr(self, name, part.to(device_or_dtype))
        return self

    def models(self) -> list:
        return [*_forward(self.patch, "models"), *_forward(self.inner, "models")]

    def cleanup(self) -> None:
        _forward(self.patch, "cleanup")
        _forward(self.inner, "cleanup")


def set_attention_replace(model, attention: str, key: tuple[str, int, int], patch: ReplacePatch) -> None:
    """Make `patch` the `attention` ("attn1"/"attn2") replace patch of the transformer block `key` (block name,
    number, depth index) of ModelPatcher `model`, chaining the patch already there. ComfyUI looks a block up by
    its 3-part key, then by (name, number): the entry it would have used is the one chained."""
    replaced = model.model_options["transformer_options"].get("patches_replace", {}).get(attention, {})
    inner = replaced.get(key) or replaced.get(key[:2]) or comfy_attention
    model.set_model_patch_replace(ChainedReplace(patch, inner), attention, *key)


class AttentionInputRecorder(SharedPatch):
    """An `attn1_patch` / `attn2_patch` that keeps what the attention will project (its query input, context and
    value input) in the block's `extra_options`, changing nothing."""

    def __init__(self, attention: str) -> None:
        self.attention = attention

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        extra_options.setdefault(ATTENTION_INPUTS, {})[self.attention] = (n, context, value)
        return n, context, value


def record_attention_inputs(model, attention: str) -> None:
    """Install the recorder for `attention` on ModelPatcher `model` unless it already has one. Register it after
    any patch that changes those inputs: patches run in the order they were set."""
    patches = model.model_options["transformer_options"].get("patches", {}).get(f"{attention}_patch", [])
    if not any(isinstance(p, AttentionInputRecorder) and p.attention == attention for p in patches):
        model.set_model_patch(AttentionInputRecorder(attention), f"{attention}_patch")


def attention_inputs(extra_options: dict, attention: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query input, context, value input) of this block's `attention`, as `record_attention_inputs` kept them."""
    try:
        return extra_options[ATTENTION_INPUTS][attention]
    except KeyError:
        raise RuntimeError(
            f"no recorded {attention} inputs in this block; call record_attention_inputs(model, '{attention}') "
            "when installing a patch that reads them"
        ) from None
