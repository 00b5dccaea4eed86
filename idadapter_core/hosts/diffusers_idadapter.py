"""Bind IDAdapter to a diffusers `UNet2DConditionModel` (the trainer's host and the parity reference).

Duck-typed on diffusers' module layout, so importing it needs no diffusers. The adapter runs between
self- and cross-attention of every `BasicTransformerBlock`: a pre-hook on the block keeps its input x,
and a forward hook on `attn1` adds the adapter's residual to the self-attention output, so the block's
own `x + attn1(...)` becomes `y + adapter_residual(y)`. The trained cross-attention K/V deltas are added
through `torch.nn.utils.parametrize` (W + s·ΔW, s from `AdapterStrength`: the weight by default, 1 in the
paper's form), which keeps the original weights untouched. `detach()` removes everything and leaves the UNet
exactly as it was.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torch.nn.utils import parametrize

from ..attention import AttentionFn, sdpa_attention
from ..errors import IncompatibleWeightsError
from ..idadapter.adapter import ReferenceKV, WeightDelta
from ..idadapter.model import IDAdapter
from ..presets import check_layout
from ..schedule import AdapterStrength
from .diffusers_unet import layout_from_diffusers_unet, transformer_blocks_in_forward_order


class _AddWeightDelta(nn.Module):
    def __init__(self, delta: WeightDelta, scale: Callable[[], float]) -> None:
        super().__init__()
        self.delta = delta
        self.scale = scale

    def forward(self, weight):
        scale = self.scale()
        return weight if scale == 0 else weight + scale * self.delta.diff.to(weight.dtype)


class DiffusersIDAdapter:
    """Attach with `DiffusersIDAdapter(unet, adapter)` (or as a context manager); `set_identity(E_r)` before
    each UNet call; `detach()` when done. `weight` (settable) scales the adapter and, unless
    `kv_follows_weight=False` (the paper's form), the trained K/V differences: 0 leaves the UNet as it was."""

    def __init__(
        self, unet: nn.Module, adapter: IDAdapter, weight: float = 1.0, attention: AttentionFn = sdpa_attention,
        kv_follows_weight: bool = True,
    ) -> None:
        self.unet = unet
        self.adapter = adapter
        self.weight = weight
        self.kv_follows_weight = kv_follows_weight
        self.attention = attention
        self._blocks = transformer_blocks_in_forward_order(unet)
        check_layout(adapter.config.layout, layout_from_diffusers_unet(unet), "this IDAdapter")
        for block in self._blocks:
            if getattr(block, "norm_type", "layer_norm") not in ("layer_norm", "layer_norm_i2vgen"):
                raise IncompatibleWeightsError(f"IDAdapter needs LayerNorm transformer blocks, found norm_type '{block.norm_type}'")
        self._references: list[ReferenceKV] | None = None
        self._block_inputs: dict[int, object] = {}
        self._handles = []
        self._attached = False
        self.attach()

    def attach(self) -> None:
        if self._attached:
            return
        for index, block in enumerate(self._blocks):
            self._handles.append(block.register_forward_pre_hook(self._keep_block_input(index), with_kwargs=True))
            self._handles.append(block.attn1.register_forward_hook(self._add_adapter_residual(index)))
        for block, kv in zip(self._blocks, self.adapter.cross_kv):
            parametrize.register_parametrization(block.attn2.to_k, "weight", _AddWeightDelta(kv.to_k, self._kv_scale))
            parametrize.register_parametrization(block.attn2.to_v, "weight", _AddWeightDelta(kv.to_v, self._kv_scale))
        self._attached = True

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._attached and len(self.adapter.cross_kv):
            for block in self._blocks:
                parametrize.remove_parametrizations(block.attn2.to_k, "weight", leave_parametrized=False)
                parametrize.remove_parametrizations(block.attn2.to_v, "weight", leave_parametrized=False)
        self._references = None
        self._block_inputs.clear()
        self._attached = False

    def set_identity(self, reference_tokens) -> None:
        """E_r (B, T, D) for the following UNet calls; its per-block K/V are computed here, once."""
        self._references = None if reference_tokens is None else self.adapter.blocks.reference_kv(reference_tokens)

    def _kv_scale(self) -> float:
        return AdapterStrength(self.weight, self.kv_follows_weight).kv_scale

    def __enter__(self) -> "DiffusersIDAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _keep_block_input(self, index: int):
        def hook(module, args, kwargs):
            self._block_inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _add_adapter_residual(self, index: int):
        def hook(module, args, output):
            block_input = self._block_inputs.pop(index)
            if self._references is None or self.weight == 0:
                return output
            after_self_attention = block_input + output
            return output + self.adapter.blocks[index].residual(
                after_self_attention, self._references[index], self.weight, self.attention
            )

        return hook
