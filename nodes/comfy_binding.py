"""Routes IDAdapter's core modules into ComfyUI's UNet (docs/DESIGN.md §4.3, "ComfyUI binding").

The adapter runs in the `middle_patch` slot of every `BasicTransformerBlock` (between self- and
cross-attention, where ComfyUI's own GLIGEN hooks in); the block is found from `transformer_index`
(counts SpatialTransformers in forward order) and `block_index` (depth inside one), mapped to our
forward-order block index by walking the model once. The trained cross-attention K/V differences are
weight patches on the cloned ModelPatcher. The patch object follows the protocol of ComfyUI's native
model-patch nodes (`__call__`, `.to()`, `.models()`, `.cleanup()`), so the adapter weights load and
offload with the UNet.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

from ..idadapter_core.errors import IncompatibleWeightsError
from ..idadapter_core.idadapter import IDAdapter, IdentityEmbeds, ReferenceKV, load_idadapter
from ..idadapter_core.presets import UNetLayout, check_layout, identify_layout
from ..idadapter_core.weights import file_fingerprint

log = logging.getLogger(__name__)


@dataclass
class LoadedIDAdapter:
    """The IDADAPTER type: the modules (built with manual_cast ops) and the patcher that manages their memory."""

    model: IDAdapter
    patcher: comfy.model_patcher.ModelPatcher
    name: str
    fingerprint: str

    @property
    def config(self):
        return self.model.config


def load_idadapter_for_comfy(path: str, name: str) -> LoadedIDAdapter:
    model = load_idadapter(
        path, operations=comfy.ops.manual_cast, require_known_base=False,
        device=comfy.model_management.unet_offload_device(),
    )
    model.eval().requires_grad_(False)
    patcher = comfy.model_patcher.CoreModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    return LoadedIDAdapter(model, patcher, name, file_fingerprint(path))


@dataclass(frozen=True)
class ComfyUNetBlocks:
    layout: UNetLayout
    first_block: tuple[int, ...]
    """Forward-order index of the first transformer block of each SpatialTransformer (by transformer_index)."""
    block_names: tuple[str, ...]
    """State-dict prefix of each transformer block, in forward order."""


def describe_unet(diffusion_model, model_name: str = "model", prediction: str | None = None) -> ComfyUNetBlocks:
    """Walk a ComfyUI UNet once: its transformer blocks in the order it runs them. `prediction` ('epsilon' or
    'v_prediction') tells SD2.1 from SD2.1-v, whose blocks are the same."""
    stages = getattr(diffusion_model, "input_blocks", None)
    if stages is None:
        raise IncompatibleWeightsError(
            f"IDAdapter works with SD1.x/SD2.x/SDXL UNets; this model ({type(diffusion_model).__name__}) has no UNet input blocks"
        )
    names = {id(module): name for name, module in diffusion_model.named_modules()}
    first_block, block_names, channels, heads = [], [], [], []
    context_dim = None
    for stage in [*diffusion_model.input_blocks, diffusion_model.middle_block, *diffusion_model.output_blocks]:
        for layer in stage:
            if not isinstance(layer, SpatialTransformer):
                continue
            first_block.append(len(block_names))
            for block in layer.transformer_blocks:
                block_names.append(f"diffusion_model.{names[id(block)]}")
                channels.append(block.attn1.to_q.in_features)
                heads.append(block.n_heads)
                context_dim = block.attn2.to_k.in_features
    if not block_names:
        raise IncompatibleWeightsError("this model has no transformer blocks to apply IDAdapter to")
    layout = identify_layout(tuple(channels), tuple(heads), context_dim, prediction=prediction, unknown_base=model_name)
    return ComfyUNetBlocks(layout, tuple(first_block), tuple(block_names))


def model_prediction(model) -> str:
    """The prediction type of a ComfyUI MODEL in diffusers' words (what the presets use)."""
    model_type = getattr(model.model, "model_type", None)
    return "v_prediction" if getattr(model_type, "name", "") == "V_PREDICTION" else "epsilon"


class IDAdapterPatch:
    """middle_patch: y + β·tanh(γ)·S([y, E_r]) (+ gated FF) in every transformer block, between start and end."""

    def __init__(
        self, adapter: LoadedIDAdapter, embeds: IdentityEmbeds, weight: float,
        sigma_start: float, sigma_end: float, first_block: tuple[int, ...],
    ) -> None:
        self.adapter = adapter
        self.reference_tokens = embeds.reference_tokens
        self.weight = weight
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.first_block = first_block
        self._reference_kv: dict[tuple, list[ReferenceKV]] = {}
        self._step_sigmas: torch.Tensor | None = None
        self._step_active = False

    def __call__(self, x: torch.Tensor, extra_options: dict) -> torch.Tensor:
        if not self._active(extra_options.get("sigmas")):
            return x
        index = self.first_block[extra_options["transformer_index"]] + extra_options.get("block_index", 0)
        attention = functools.partial(optimized_attention, attn_precision=extra_options.get("attn_precision"))
        block = self.adapter.model.blocks[index]
        return x + block.residual(x, self._references(x)[index], self.weight, attention)

    def _active(self, sigmas) -> bool:
        if self.weight == 0:
            return False
        if sigmas is None:
            return True
        if sigmas is not self._step_sigmas:  # read the sigma once per step, not in every block (a device sync)
            sigma = float(sigmas.detach().max())
            self._step_sigmas, self._step_active = sigmas, self.sigma_end <= sigma <= self.sigma_start
        return self._step_active

    def _references(self, x: torch.Tensor) -> list[ReferenceKV]:
        """E_r's per-block K/V, computed once per device and dtype (E_r is constant during sampling)."""
        key = (x.device, x.dtype)
        if key not in self._reference_kv:
            with torch.no_grad():
                self._reference_kv[key] = self.adapter.model.blocks.reference_kv(self.reference_tokens.to(x))
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
        self._step_sigmas = None


def apply_idadapter(model, adapter: LoadedIDAdapter, embeds: IdentityEmbeds, weight: float, start_at: float, end_at: float):
    """A clone of MODEL carrying the adapter patch and the cross-attention K/V weight patches."""
    embeds.check_made_by(adapter.fingerprint, adapter.name)
    blocks = describe_unet(
        model.get_model_object("diffusion_model"), type(model.model.model_config).__name__, model_prediction(model)
    )
    check_layout(adapter.config.layout, blocks.layout, adapter.name)
    model_sampling = model.get_model_object("model_sampling")
    patch = IDAdapterPatch(
        adapter, embeds, weight,
        sigma_start=float(model_sampling.percent_to_sigma(start_at)),
        sigma_end=float(model_sampling.percent_to_sigma(end_at)),
        first_block=blocks.first_block,
    )
    patched = model.clone()
    patched.set_model_patch(patch, "middle_patch")
    kv_patches = {}
    for name, kv in zip(blocks.block_names, adapter.model.cross_kv):
        kv_patches[f"{name}.attn2.to_k.weight"] = ("diff", (kv.to_k.diff.detach(),))
        kv_patches[f"{name}.attn2.to_v.weight"] = ("diff", (kv.to_v.diff.detach(),))
    if kv_patches:
        missing = set(kv_patches) - set(patched.add_patches(kv_patches, 1.0))
        if missing:
            raise IncompatibleWeightsError(f"the model has no weight {sorted(missing)[0]} for the trained cross-attention K/V")
    return patched


def encode_identity(adapter: LoadedIDAdapter, clip_patches, face_embeds, clip_image_embeds) -> IdentityEmbeds:
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


def identity_tokens_for_clip(clip, tokens: dict, adapter: LoadedIDAdapter, embeds: IdentityEmbeds) -> dict[str, torch.Tensor]:
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
