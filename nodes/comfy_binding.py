"""What every method's ComfyUI binding shares (docs/DESIGN.md §4.3, "ComfyUI binding"); IDAdapter's patches are in
`idadapter_binding.py`, Inv-Adapter's in `inv_adapter_binding.py`, the attention-patch plumbing in `comfy_patches.py`.

- the weights: each method's `models/<folder>` (`register_weights_folder`) and loading into a patcher that ComfyUI loads
  and offloads with the UNet (`load_adapter_for_comfy`);
- the UNet: one walk (`describe_unet`) gives its layout, the forward-order index of each SpatialTransformer's first
  transformer block (a patch finds its block from ComfyUI's `transformer_index` and `block_index`: `block_index`)
  and each block's `patches_replace` key;
- where and when a patch acts: the start/end window over the noise levels (`step_window`), the region mask at each
  block's token grid (`idadapter_core.masks`), and both at once (`active_mask`: None where the patch is off), the
  positive and negative chunks of a CFG batch (`negative_chunks`, `chunk_rows`), the attention kernel the adapters
  run with (`block_attention`).
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
from ..idadapter_core.masks import GridMask, RegionMask
from ..idadapter_core.presets import UNetLayout, identify_layout
from ..idadapter_core.schedule import StepWindow, check_schedule
from ..idadapter_core.weights import file_fingerprint

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


def describe_model(model) -> ComfyUNetBlocks:
    """`describe_unet` of a ComfyUI MODEL's UNet, named after its model config, its prediction type told."""
    return describe_unet(
        model.get_model_object("diffusion_model"), type(model.model.model_config).__name__, model_prediction(model)
    )


def block_index(first_block: tuple[int, ...], extra_options: dict) -> int:
    """Forward-order index of the transformer block a patch is called in: ComfyUI passes which SpatialTransformer
    (`transformer_index`, counted in forward order) and the depth inside it (`block_index`)."""
    return first_block[extra_options["transformer_index"]] + extra_options.get("block_index", 0)


def step_window(model, start_at: float, end_at: float) -> StepWindow:
    """The steps between `start_at` and `end_at` (fractions of the sampling schedule) as noise levels of MODEL."""
    check_schedule(start_at, end_at)
    model_sampling = model.get_model_object("model_sampling")
    return StepWindow(float(model_sampling.percent_to_sigma(start_at)), float(model_sampling.percent_to_sigma(end_at)))


def adapter_attention(device: torch.device):
    """The attention kernel the adapter runs with: ComfyUI's own (through its attention wrapper, so a model's
    attention override applies), except on a CPU where ComfyUI fell back to sub-quadratic attention by default
    (no --use-quad-cross-attention): there PyTorch's SDPA, blockwise too and so no hungrier, runs the adapter's
    attention over [y, E_r] (4096 x 5121 in SD1.5's highest-resolution blocks) about twice as fast; the UNet's own
    attention keeps ComfyUI's kernel (docs/DESIGN.md §6)."""
    if device.type == "cpu" and optimized_attention is attention_sub_quad and not args.use_quad_cross_attention:
        return attention_pytorch
    return optimized_attention


def block_attention(device: torch.device, extra_options: dict) -> Callable[..., torch.Tensor]:
    """`adapter_attention` with the block's attention precision and transformer options, as the block runs its own."""
    return functools.partial(
        adapter_attention(device), attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )


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
    rows = {False: [], True: []}
    for chunk, is_negative in enumerate(negatives):
        rows[bool(is_negative)].extend(range(chunk * size, (chunk + 1) * size))
    # Index lists built here, not a boolean mask on the device: no nonzero(), so FLOP counting under fake tensors
    # (bench/inv_adapter_cost.py --flops) can run the patch.
    return torch.tensor(rows[False], device=device), torch.tensor(rows[True], device=device)


def block_mask(region: RegionMask, tokens: torch.Tensor, extra_options: dict) -> GridMask:
    """`region` at the token grid of the block whose (batch, tokens, channels) rows are `tokens`: the latent's shape
    (`original_shape`, set by ComfyUI's UNet) gives the grid, `cond_or_uncond` how many chunks the batch stacks."""
    chunks = len(extra_options.get("cond_or_uncond") or [None])
    latent_hw = tuple(extra_options["original_shape"][-2:])
    return region.at(tokens.shape[1], tokens.shape[0], chunks, latent_hw, tokens.device, tokens.dtype)


EVERYWHERE = GridMask(torch.ones(()), is_off=False, is_full=True)
"""What `active_mask` gives a patch without a region mask: every token, at full strength."""


def active_mask(region: RegionMask | None, tokens: torch.Tensor, extra_options: dict,
                window: StepWindow | None = None) -> GridMask | None:
    """Where a patch acts in the block whose rows are `tokens`, at this step: None where it does not act at all
    (outside its `window`, or its `region` is 0 over the block's grid: the block then computes exactly what the
    unpatched model computes), else the mask to scale what it adds by (`is_full`: no scaling needed)."""
    if window is not None and not window.contains(extra_options.get("sigmas")):
        return None
    if region is None:
        return EVERYWHERE
    mask = block_mask(region, tokens, extra_options)
    return None if mask.is_off else mask


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


