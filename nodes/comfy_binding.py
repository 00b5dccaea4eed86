"""Routes IDAdapter's core modules into ComfyUI's UNet (docs/DESIGN.md §4.3, "ComfyUI binding").

The adapter runs in the `middle_patch` slot of every `BasicTransformerBlock` (between self- and
cross-attention, where ComfyUI's own GLIGEN hooks in); the block is found from `transformer_index`
(counts SpatialTransformers in forward order) and `block_index` (depth inside one), mapped to our
forward-order block index by walking the model once. The trained cross-attention K/V differences enter
through each block's attn2 replace patch (chained onto any already there, `comfy_patches.py`) as
K + s·ΔW_K·c, V + s·ΔW_V·c, so the weight and the start/end window govern them like the adapter, and
outside the window the block computes exactly what the unpatched model computes. With a region mask both parts
are confined to it, per block at the block's token grid (`idadapter_core.masks`). The patch objects follow
the protocol of ComfyUI's native model-patch nodes (`__call__`, `.to()`, `.models()`, `.cleanup()`), so
the adapter weights load and offload with the UNet.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import folder_paths
from comfy.cli_args import args
from comfy.ldm.modules.attention import SpatialTransformer, attention_pytorch, attention_sub_quad, optimized_attention

from ..idadapter_core.errors import IncompatibleWeightsError
from ..idadapter_core.idadapter import IdentityEmbeds, ReferenceKV, load_idadapter
from ..idadapter_core.masks import GridMask, RegionMask
from ..idadapter_core.presets import UNetLayout, check_layout, identify_layout
from ..idadapter_core.schedule import (
    BLOCK_MODES, NEGATIVE_IDENTITY_MODES, AdapterStrength, StepWindow, adapter_blocks, check_schedule, identity_in_negative,
)
from ..idadapter_core.weights import file_fingerprint
from .comfy_patches import SharedPatch, attention_inputs, record_attention_inputs, set_attention_replace

log = logging.getLogger(__name__)


WEIGHTS_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
"""Listed by the weights loaders. Only .safetensors loads; a pickle or PyTorch checkpoint is listed so that picking it
says why it is refused (weights.py), rather than the file silently not showing up."""


def register_weights_folder(folder: str) -> None:
    """`models/<folder>` for a method's weights; a path already set in extra_model_paths.yaml is kept."""
    if folder not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(folder, os.path.join(folder_paths.models_dir, folder), is_default=True)
    folder_paths.folder_names_and_paths[folder] = (folder_paths.folder_names_and_paths[folder][0], WEIGHTS_EXTENSIONS)


ADAPTER_PATCHER = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
"""What manages the adapter's memory: CoreModelPatcher, the patcher ComfyUI gives its own small models (CLIP vision,
ControlNets; v0.12.0 on, so far another name of ModelPatcher), or ModelPatcher before v0.12.0."""


@dataclass
class LoadedAdapter:
    """The IDADAPTER and INV_ADAPTER types: the modules (built with manual_cast ops) and the patcher that manages
    their memory with the UNet's."""

    model: torch.nn.Module
    patcher: comfy.model_patcher.ModelPatcher
    name: str
    fingerprint: str

    @property
    def config(self):
        return self.model.config


def load_adapter_for_comfy(path: str, name: str, loader: Callable[..., torch.nn.Module]) -> LoadedAdapter:
    """Load either method's weights with `loader` (`load_idadapter`, `load_inv_adapter`) onto the offload device,
    wrapped so ComfyUI loads and offloads them with the UNet (lowvram included). The weights are stored in the dtype
    ComfyUI would compute a UNet in on this device (fp32 on CPU, usually fp16 on a GPU), as it does for a checkpoint:
    manual_cast then has nothing to convert at each step (an fp16 file on CPU cost ~0.4 GB of casts per step)."""
    model = loader(
        path, operations=comfy.ops.manual_cast, require_known_base=False,
        device=comfy.model_management.unet_offload_device(),
    )
    parameters = list(model.parameters())
    dtype = comfy.model_management.unet_dtype(
        model_params=sum(p.numel() for p in parameters), weight_dtype=parameters[0].dtype if parameters else None
    )
    model.to(dtype=dtype).eval().requires_grad_(False)
    patcher = ADAPTER_PATCHER(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    return LoadedAdapter(model, patcher, name, file_fingerprint(path))


def load_idadapter_for_comfy(path: str, name: str) -> LoadedAdapter:
    return load_adapter_for_comfy(path, name, load_idadapter)


@dataclass(frozen=True)
class ComfyUNetBlocks:
    layout: UNetLayout
    first_block: tuple[int, ...]
    """Forward-order index of the first transformer block of each SpatialTransformer (by transformer_index)."""
    block_names: tuple[str, ...]
    """State-dict prefix of each transformer block, in forward order."""
    replace_keys: tuple[tuple[str, int, int], ...]
    """Each transformer block's key in `patches_replace` ((block name, block number, depth index)), in forward order."""


def describe_unet(diffusion_model, model_name: str = "model", prediction: str | None = None) -> ComfyUNetBlocks:
    """Walk a ComfyUI UNet once: its transformer blocks in the order it runs them. `prediction` ('epsilon' or
    'v_prediction') tells SD2.1 from SD2.1-v, whose blocks are the same."""
    stages = getattr(diffusion_model, "input_blocks", None)
    if stages is None:
        raise IncompatibleWeightsError(
            f"the identity adapters work with SD1.x/SD2.x/SDXL UNets; this model ({type(diffusion_model).__name__}) has no UNet input blocks"
        )
    names = {id(module): name for name, module in diffusion_model.named_modules()}
    first_block, block_names, replace_keys, channels, heads = [], [], [], [], []
    context_dim = None
    stages = [
        *(("input", i, stage) for i, stage in enumerate(diffusion_model.input_blocks)),
        ("middle", 0, diffusion_model.middle_block),
        *(("output", i, stage) for i, stage in enumerate(diffusion_model.output_blocks)),
    ]
    for stage_name, stage_number, stage in stages:
        for layer in stage:
            if not isinstance(layer, SpatialTransformer):
                continue
            first_block.append(len(block_names))
            for depth, block in enumerate(layer.transformer_blocks):
                block_names.append(f"diffusion_model.{names[id(block)]}")
                replace_keys.append((stage_name, stage_number, depth))
                channels.append(block.attn1.to_q.in_features)
                heads.append(block.n_heads)
                context_dim = block.attn2.to_k.in_features
    if not block_names:
        raise IncompatibleWeightsError("this model has no transformer blocks to apply an identity adapter to")
    layout = identify_layout(tuple(channels), tuple(heads), context_dim, prediction=prediction, unknown_base=model_name)
    return ComfyUNetBlocks(layout, tuple(first_block), tuple(block_names), tuple(replace_keys))


def model_prediction(model) -> str:
    """The prediction type of a ComfyUI MODEL in diffusers' words (what the presets use)."""
    model_type = getattr(model.model, "model_type", None)
    return "v_prediction" if getattr(model_type, "name", "") == "V_PREDICTION" else "epsilon"


def adapter_attention(device: torch.device):
    """The attention kernel the adapter runs with: ComfyUI's own (through its attention wrapper, so a model's
    attention override applies), except on a CPU where ComfyUI fell back to sub-quadratic attention by default
    (no --use-quad-cross-attention): there PyTorch's SDPA, blockwise too and so no hungrier, runs the adapter's
    attention over [y, E_r] (4096 x 5121 in SD1.5's highest-resolution blocks) about twice as fast; the UNet's own
    attention keeps ComfyUI's kernel (docs/DESIGN.md §6)."""
    if device.type == "cpu" and optimized_attention is attention_sub_quad and not args.use_quad_cross_attention:
        return attention_pytorch
    return optimized_attention


NEGATIVE_CHUNK = 1
"""ComfyUI's index of the negative conditioning in `cond_or_uncond` (CFG's guider lists [positive, negative])."""


def negative_chunks(extra_options: dict) -> tuple[bool, ...]:
    """Per chunk of the batch, whether it is a negative (unconditional) one. A sampler stacks the conds and unconds
    it evaluates together as equal chunks and lists their indices in `cond_or_uncond`; outside a sampler (a direct
    UNet call) there is none, and every row counts as positive."""
    return tuple(kind == NEGATIVE_CHUNK for kind in extra_options.get("cond_or_uncond") or ())


def chunk_rows(extra_options: dict, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch rows of the positive chunks and of the negative ones (guidance over the identity gives only the
    positive ones the identity), or None when every row is positive."""
    negatives = negative_chunks(extra_options)
    if not any(negatives):
        return None
    size = batch // len(negatives)
    rows = torch.arange(batch, device=device).view(len(negatives), size)
    negative = torch.tensor(negatives, device=device)
    return rows[~negative].reshape(-1), rows[negative].reshape(-1)


def block_mask(region: RegionMask, tokens: torch.Tensor, extra_options: dict) -> GridMask:
    """`region` at the token grid of the block whose (batch, tokens, channels) rows are `tokens`: the latent's shape
    (`original_shape`, set by ComfyUI's UNet) gives the grid, `cond_or_uncond` how many chunks the batch stacks."""
    chunks = len(extra_options.get("cond_or_uncond") or [None])
    latent_hw = tuple(extra_options["original_shape"][-2:])
    return region.at(tokens.shape[1], tokens.shape[0], chunks, latent_hw, tokens.device, tokens.dtype)


def mask_covers_nothing(region: RegionMask | None, node: str) -> bool:
    """Whether `node`'s region mask is 0 everywhere, which leaves the model as it is: almost always a mistake, so it
    is said with a WARNING that names the node and the usual cause."""
    if region is None or not region.covers_nothing:
        return False
    log.warning(
        "%s: the mask is 0 everywhere, so the identity is applied nowhere and the model is left as it is. The usual "
        "cause: Load Image's MASK of an image without transparency (or a fully opaque RGBA image) is all zeros, "
        "since it is the image's transparency. Paint the region in the mask editor, invert the mask (Invert Mask), "
        "or disconnect the mask to apply the identity to the whole image.", node,
    )
    return True


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
        if not self.window.contains(extra_options.get("sigmas")):
            return x
        index = self.first_block[extra_options["transformer_index"]] + extra_options.get("block_index", 0)
        if index not in self.blocks:
            return x
        mask = None if self.region is None else block_mask(self.region, x, extra_options)
        if mask is not None and mask.is_off:
            return x
        attention = functools.partial(
            adapter_attention(x.device), attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
        )
        block = self.adapter.model.blocks[index]
        residual = block.residual(x, self._chunk_references(x, index, extra_options), self.scale, attention)
        if mask is not None and not mask.is_full:
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
        if not self.window.contains(extra_options.get("sigmas")):
            return inner(q, k, v, extra_options)
        mask = None if self.region is None else block_mask(self.region, q, extra_options)
        if mask is not None and mask.is_off:
            return inner(q, k, v, extra_options)
        _, context, value = attention_inputs(extra_options, "attn2")
        shifted_k, shifted_v = self.adapter.model.cross_kv[self.index].shift(k, v, context, value, self.scale)
        shifted = inner(q, shifted_k, shifted_v, extra_options)
        if mask is None or mask.is_full:
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
    check_schedule(start_at, end_at)
    region = None if mask is None else RegionMask(mask)
    unet = describe_unet(
        model.get_model_object("diffusion_model"), type(model.model.model_config).__name__, model_prediction(model)
    )
    check_layout(adapter.config.layout, unet.layout, adapter.name)
    patched = model.clone()
    if mask_covers_nothing(region, "Apply IDAdapter"):
        return patched
    if strength.is_off:
        log.info("IDAdapter: weight 0, the model is left as it is")
        return patched
    model_sampling = model.get_model_object("model_sampling")
    window = StepWindow(float(model_sampling.percent_to_sigma(start_at)), float(model_sampling.percent_to_sigma(end_at)))
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
