"""Routes IDAdapter's core modules into ComfyUI's UNet (docs/DESIGN.md §4.3, "ComfyUI binding"); what both methods'
bindings share is in `comfy_binding.py`.

The adapter runs in the `middle_patch` slot of every `BasicTransformerBlock` (between self- and cross-attention,
where ComfyUI's own GLIGEN hooks in), in the block `comfy_binding.block_index` names. The trained cross-attention K/V
differences enter through each block's attn2 replace patch (chained onto any already there, `comfy_patches.py`) as
K + s·ΔW_K·c, V + s·ΔW_V·c, so the weight and the start/end window govern them like the adapter, and outside the
window the block computes exactly what the unpatched model computes. With a region mask both parts are confined to
it, per block at the block's token grid (`comfy_binding.active_mask`). The patch objects follow the protocol of
ComfyUI's native model-patch nodes (`__call__`, `.to()`, `.models()`, `.cleanup()`), so the adapter weights load and
offload with the UNet.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management

from ..idadapter_core.errors import IncompatibleWeightsError
from ..idadapter_core.idadapter import IdentityEmbeds, ReferenceKV, load_idadapter
from ..idadapter_core.masks import RegionMask
from ..idadapter_core.presets import check_layout
from ..idadapter_core.schedule import (
    BLOCK_MODES, NEGATIVE_IDENTITY_MODES, AdapterStrength, StepWindow, adapter_blocks, identity_in_negative,
)
from .comfy_binding import (
    LoadedAdapter, active_mask, block_attention, block_index, describe_model, load_adapter_for_comfy,
    mask_covers_nothing, negative_chunks, step_window,
)
from .comfy_patches import SharedPatch, attention_inputs, record_attention_inputs, set_attention_replace

log = logging.getLogger(__name__)


def load_idadapter_for_comfy(path: str, name: str) -> LoadedAdapter:
    return load_adapter_for_comfy(path, name, load_idadapter)


class IDAdapterPatch(SharedPatch):
    """middle_patch: y + β·tanh(γ)·S([y, E_r]) (+ gated FF) in the chosen transformer blocks, inside the window;
    with a region mask, y + mask·(what the adapter adds). Unless `identity_in_negative`, the negative chunks of a
    CFG batch attend to the null identity, E_r = 0, as identity dropout trains it (guidance over the identity)."""

    def __init__(
        self, adapter: LoadedAdapter, embeds: IdentityEmbeds, scale: float, window: StepWindow,
        first_block: tuple[int, ...], blocks: frozenset[int], region: RegionMask | None = None,
        identity_in_negative: bool = False,
    ) -> None:
        self.adapter = adapter
        self.reference_tokens = embeds.reference_tokens
        self.scale = scale
        self.window = window
        self.first_block = first_block
        self.blocks = blocks
        self.region = region
        self.identity_in_negative = identity_in_negative
        self._reference_kv: dict[tuple, dict[int, ReferenceKV]] = {}

    def __call__(self, x: torch.Tensor, extra_options: dict) -> torch.Tensor:
        index = block_index(self.first_block, extra_options)
        mask = active_mask(self.region, x, extra_options, self.window) if index in self.blocks else None
        if mask is None:
            return x
        block = self.adapter.model.blocks[index]
        references = self._chunk_references(x, index, extra_options)
        residual = block.residual(x, references, self.scale, block_attention(x.device, extra_options))
        if not mask.is_full:
            residual.mul_(mask.values)  # exact: where the mask is 0, x + 0 is x
        return x + residual

    def _chunk_references(self, x: torch.Tensor, index: int, extra_options: dict) -> ReferenceKV:
        """The block's reference K/V for every row: the identity's, or per chunk the identity's for positive chunks
        and the null identity's for negative ones."""
        negatives = () if self.identity_in_negative else negative_chunks(extra_options)
        identity = self._references(x, null=False)[index]
        if not any(negatives):
            return identity
        null = self._references(x, null=True)[index]
        return ReferenceKV.per_chunk([null if n else identity for n in negatives], x.shape[0] // len(negatives))

    def _references(self, x: torch.Tensor, null: bool) -> dict[int, ReferenceKV]:
        """E_r's (or, `null`, E_r = 0's) K/V for each chosen block, computed once per device and dtype (E_r is
        constant during sampling)."""
        key = (x.device, x.dtype, null)
        if key not in self._reference_kv:
            e_r = self.reference_tokens.to(x)
            if null:
                e_r = torch.zeros_like(e_r)
            with torch.no_grad():
                self._reference_kv[key] = {i: self.adapter.model.blocks[i].reference_kv(e_r) for i in self.blocks}
        return self._reference_kv[key]

    def to(self, device_or_dtype):
        if isinstance(device_or_dtype, torch.device):
            self.reference_tokens = self.reference_tokens.to(device_or_dtype)
            self._reference_kv.clear()
        return self

    def models(self) -> list:
        return [self.adapter.patcher]

    def cleanup(self) -> None:
        self._reference_kv.clear()
        self.window.reset()
        if self.region is not None:
            self.region.clear()


class CrossAttentionKVPatch(SharedPatch):
    """attn2 replace patch of one block: its trained cross-attention K/V differences, W + s·ΔW, inside the window;
    outside it the keys and values go on untouched. The previous replace patch of the block (another pack's, or
    ComfyUI's own attention) runs on the result. With a region mask the block attends with both and blends the rows,
    base + mask·(shifted − base) (torch.lerp: exactly the base where the mask is 0, the shifted where it is 1)."""

    def __init__(self, adapter: LoadedAdapter, index: int, scale: float, window: StepWindow,
                 region: RegionMask | None = None) -> None:
        self.adapter = adapter
        self.index = index
        self.scale = scale
        self.window = window
        self.region = region

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict, inner) -> torch.Tensor:
        mask = active_mask(self.region, q, extra_options, self.window)
        if mask is None:
            return inner(q, k, v, extra_options)
        _, context, value = attention_inputs(extra_options, "attn2")
        shifted_k, shifted_v = self.adapter.model.cross_kv[self.index].shift(k, v, context, value, self.scale)
        shifted = inner(q, shifted_k, shifted_v, extra_options)
        if mask.is_full:
            return shifted
        return torch.lerp(inner(q, k, v, extra_options), shifted, mask.values)

    def models(self) -> list:
        return [self.adapter.patcher]


def apply_idadapter(
    model, adapter: LoadedAdapter, embeds: IdentityEmbeds, strength: AdapterStrength, start_at: float, end_at: float,
    blocks_mode: str = BLOCK_MODES[0], mask: torch.Tensor | None = None,
    negative_identity: str = NEGATIVE_IDENTITY_MODES[0],
):
    """A clone of MODEL with the adapter (middle_patch) and the trained cross-attention K/V differences (attn2 replace
    patches, chained onto any already there), both at `strength`, only between start_at and end_at and, with a
    `mask`, only where it is (its value scales them). `negative_identity` (NEGATIVE_IDENTITY_MODES): whether CFG's
    negative half attends to the identity or to the null identity."""
    embeds.check_made_by(adapter.fingerprint, adapter.name)
    in_negative = identity_in_negative(negative_identity)
    window = step_window(model, start_at, end_at)
    region = None if mask is None else RegionMask(mask)
    unet = describe_model(model)
    check_layout(adapter.config.layout, unet.layout, adapter.name)
    patched = model.clone()
    if mask_covers_nothing(region, "Apply IDAdapter"):
        return patched
    if strength.is_off:
        log.info("IDAdapter: weight 0, the model is left as it is")
        return patched
    if strength.adapter_scale:
        blocks = adapter_blocks(unet.layout, blocks_mode)
        patched.set_model_patch(
            IDAdapterPatch(adapter, embeds, strength.adapter_scale, window, unet.first_block, blocks, region, in_negative),
            "middle_patch",
        )
    if strength.kv_scale and len(adapter.model.cross_kv):
        record_attention_inputs(patched, "attn2")
        for index, key in enumerate(unet.replace_keys):
            set_attention_replace(patched, "attn2", key, CrossAttentionKVPatch(
                adapter, index, strength.kv_scale, window, region))
    return patched


def encode_identity(adapter: LoadedAdapter, clip_patches, face_embeds, clip_image_embeds) -> IdentityEmbeds:
    """Run MFF and the identity-token MLP once, on the device ComfyUI loads the adapter to."""
    comfy.model_management.load_models_gpu([adapter.patcher])
    device = adapter.patcher.load_device
    dtype = torch.float32
    with torch.no_grad():
        embeds = adapter.model.encode(
            clip_patches.to(device, dtype), face_embeds.to(device, dtype), clip_image_embeds.to(device, dtype)
        )
    offload = comfy.model_management.intermediate_device()
    return IdentityEmbeds(
        embeds.reference_tokens.to(offload),
        {key: value.to(offload) for key, value in embeds.identity_tokens.items()},
        adapter.fingerprint, adapter.name,
    )


def trigger_token_id(clip, key: str, trigger_word: str) -> int:
    tokenizer = getattr(clip.tokenizer, f"clip_{key}", None)
    if tokenizer is None:
        raise IncompatibleWeightsError(f"this CLIP has no '{key}' text encoder")
    ids = tokenizer.tokenizer(trigger_word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise IncompatibleWeightsError(
            f"the trigger word '{trigger_word}' is {len(ids)} CLIP tokens; it must be exactly one (e.g. 'sks')"
        )
    return ids[0]


def identity_tokens_for_clip(clip, tokens: dict, adapter: LoadedAdapter, embeds: IdentityEmbeds) -> dict[str, torch.Tensor]:
    """E_c for each text encoder in this CLIP's `tokens`; a clear error when the weights were trained for others."""
    keys = set(tokens)
    trained = adapter.config.layout.text_widths
    if keys != set(trained):
        raise IncompatibleWeightsError(
            f"'{adapter.name}' was trained for the text encoder(s) {sorted(trained)} ({adapter.config.layout.base}), "
            f"but this CLIP has {sorted(keys)}; use the CLIP of the checkpoint the weights were trained for."
        )
    out = {}
    for key, width in trained.items():
        expected = getattr(getattr(clip.tokenizer, f"clip_{key}", None), "embedding_size", width)
        if expected != width:
            raise IncompatibleWeightsError(
                f"'{adapter.name}' makes {width}-wide '{key}' token embeddings, but this CLIP's '{key}' encoder is {expected} wide"
            )
        out[key] = embeds.identity_tokens[key]
    return out


def replace_trigger_tokens(tokens: dict, trigger_ids: dict[str, int], identity_tokens: dict[str, torch.Tensor]) -> int:
    """Put E_c in place of every trigger token: ComfyUI's text encoders splice tensors found in a token list in
    as input embeddings (`sd1_clip.process_tokens`, the textual-inversion path). Returns how many were replaced."""
    replaced = 0
    for key, chunks in tokens.items():
        vector = identity_tokens[key][0]
        for chunk in chunks:
            for i, item in enumerate(chunk):
                if isinstance(item[0], int) and item[0] == trigger_ids[key]:
                    chunk[i] = (vector, *item[1:])
                    replaced += 1
    return replaced
