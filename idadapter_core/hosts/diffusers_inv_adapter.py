"""Bind Inv-Adapter to a diffusers `UNet2DConditionModel` (the trainer's host and the ComfyUI parity reference).

Each transformer block's `attn1` and `attn2` get an attention processor (diffusers' own mechanism, like
`IPAdapterAttnProcessor2_0`) that passes through to the original processor unless the binding is recording or
injecting. `record_reference(...)` runs the UNet on a reference latent and keeps every block's self-attention input
norm1(h) (the processor sees it as `hidden_states`); `set_reference(features)` projects them once through the EAA;
UNet calls after that run the EAA, in every row of the batch or, with `set_reference(features, rows=mask)`, only in
the rows the mask selects (e.g. the positive half of classifier-free guidance): the other rows go through the original
processors on the whole batch, so they are exactly the unpatched UNet's. `blocks` (forward-order indices; None: all)
are the blocks the EAA acts in, as Apply Inv-Adapter's `blocks` mode sets them (`schedule.adapter_blocks`); the
others run their original processors. `detach()` restores the original processors.
Duck-typed: no diffusers import.
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import AttentionFn, sdpa_attention
from ..errors import IncompatibleWeightsError
from ..inv_adapter import Denoiser, EAAReferenceKV, InvAdapter
from ..presets import check_layout
from .diffusers_unet import layout_from_diffusers_unet, transformer_blocks_in_forward_order


class _EAAProcessor:
    """Self- (`cross=False`) or cross-attention of block `index` with the EAA; the original processor otherwise."""

    def __init__(self, binding: "DiffusersInvAdapter", index: int, cross: bool, original) -> None:
        self.binding = binding
        self.index = index
        self.cross = cross
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        binding = self.binding
        if binding.recording is not None and not self.cross:
            binding.recording[self.index] = hidden_states.detach() if binding.detach_recorded else hidden_states
        if (binding.references is None or binding.recording is not None or binding.weight == 0
                or (binding.blocks is not None and self.index not in binding.blocks)):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None or attn.group_norm is not None or attn.spatial_norm is not None:
            raise IncompatibleWeightsError("Inv-Adapter supports plain SD transformer blocks (no attention masks or group norms)")
        rows = binding.rows
        if rows is None:
            return self._with_eaa(attn, hidden_states, encoder_hidden_states)
        if len(rows) != len(hidden_states):
            raise ValueError(f"the EAA's row mask has {len(rows)} rows, the batch {len(hidden_states)}")
        plain = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        selected = rows.to(hidden_states.device).nonzero().squeeze(1)
        if len(selected) == 0:
            return plain
        context = None if encoder_hidden_states is None else encoder_hidden_states[selected]
        return plain.index_copy(0, selected, self._with_eaa(attn, hidden_states[selected], context).to(plain.dtype))

    def _with_eaa(self, attn, hidden_states, encoder_hidden_states):
        binding = self.binding
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        block = binding.adapter.blocks[self.index]
        ref = binding.references[self.index]
        attend = block.cross_attention if self.cross else block.self_attention
        out = attend(q, k, v, ref, attn.heads, binding.weight, binding.attention)
        return attn.to_out[1](attn.to_out[0](out))


class DiffusersInvAdapter:
    """Attach with `DiffusersInvAdapter(unet, adapter)` (or as a context manager); per step
    `set_reference(record_reference(...))` then the UNet call; `detach()` when done."""

    def __init__(self, unet: nn.Module, adapter: InvAdapter, weight: float = 1.0, attention: AttentionFn = sdpa_attention,
                 detach_recorded: bool = True) -> None:
        self.unet = unet
        self.adapter = adapter
        self.weight = weight
        self.attention = attention
        self.detach_recorded = detach_recorded
        """Reference features carry no gradient (the UNet is frozen; training only the EAA)."""
        self.recording: dict[int, torch.Tensor] | None = None
        self.references: list[EAAReferenceKV] | None = None
        self.rows: torch.Tensor | None = None
        """(B,) bool: the batch rows that get the EAA (None: every row)."""
        self.blocks: frozenset[int] | None = None
        """The transformer blocks (forward order) the EAA acts in (None: every block)."""
        self._blocks = transformer_blocks_in_forward_order(unet)
        check_layout(adapter.config.layout, layout_from_diffusers_unet(unet), "this Inv-Adapter", method="Inv-Adapter")
        self._originals: list[tuple] = []
        self.attach()

    def attach(self) -> None:
        if self._originals:
            return
        for index, block in enumerate(self._blocks):
            pair = (block.attn1.processor, block.attn2.processor)
            block.attn1.set_processor(_EAAProcessor(self, index, False, pair[0]))
            block.attn2.set_processor(_EAAProcessor(self, index, True, pair[1]))
            self._originals.append(pair)

    def detach(self) -> None:
        for block, (self_processor, cross_processor) in zip(self._blocks, self._originals):
            block.attn1.set_processor(self_processor)
            block.attn2.set_processor(cross_processor)
        self._originals.clear()
        self.recording = None
        self.references = None
        self.rows = None

    def record_reference(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **unet_kwargs) -> list[torch.Tensor]:
        """Run the UNet on the reference (its input at `timestep`, already scaled as the UNet takes it) and return
        every block's self-attention input, in forward order."""
        self.recording = {}
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_recorded):
                self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **unet_kwargs)
            return [self.recording[i] for i in range(len(self._blocks))]
        finally:
            self.recording = None

    def set_reference(self, features: list[torch.Tensor] | None, rows: torch.Tensor | None = None) -> None:
        """The reference features of the following UNet calls (None: the EAA off), for every row of their batch or,
        with `rows` ((B,) bool), only for the rows it selects."""
        self.references = None if features is None else self.adapter.blocks.reference_kv(features)
        self.rows = None if features is None or rows is None else rows.bool()

    def __enter__(self) -> "DiffusersInvAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def diffusers_denoiser(unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str,
                       encoder_hidden_states: torch.Tensor, **unet_kwargs) -> tuple[Denoiser, torch.Tensor]:
    """A denoiser over a diffusers UNet in the k-diffusion parameterisation `inversion.py` uses, and the schedule's
    σ of every timestep. σ must be one of those (the nearest timestep is used, as ComfyUI does)."""
    alphas = alphas_cumprod.detach().double().cpu()
    sigmas = ((1 - alphas) / alphas).sqrt().float()

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = int((sigmas.log() - torch.tensor(sigma).log()).abs().argmin())
        a = float(alphas[t])
        z = x * a**0.5
        out = unet(z, t, encoder_hidden_states=encoder_hidden_states, **unet_kwargs).sample
        if prediction_type == "epsilon":
            return (z - (1 - a) ** 0.5 * out) / a**0.5
        if prediction_type == "v_prediction":
            return a**0.5 * z - (1 - a) ** 0.5 * out
        raise ValueError(f"unsupported prediction type '{prediction_type}'")

    return denoise, sigmas
