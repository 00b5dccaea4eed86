"""Routes Inv-Adapter into ComfyUI (docs/DESIGN.md §3, §4.3); what both methods' bindings share is in
`comfy_binding.py`.

Inversion runs through ComfyUI's own sampling (`comfy.sample.sample_custom` with a sampler that walks the noise
levels upwards), so model loading, conditioning (SDXL's pooled/size inputs included) and ε/v prediction are
ComfyUI's; an APPLY_MODEL wrapper captures the null prompt's conditioning on the way. Apply returns a clone with:
- an APPLY_MODEL wrapper that, at each step inside [start, end], first runs the UNet on the inverted reference at the
  matching noise level with only a recording `attn1_patch` (the self-attention input of every block), then the
  real batch;
- `attn1` and `attn2` replace patches on every transformer block that add the EAA, chained with any replace already
  set for that block (`comfy_patches.set_attention_replace`: it still computes the block's own attention); with a
  region mask, what the EAA adds is scaled by the mask at the block's token grid (`comfy_binding.active_mask`).
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers

from ..idadapter_core.errors import IDAdapterError, IncompatibleWeightsError
from ..idadapter_core.face import FaceAnalyzer, align_reference, detect_face, to_rgb_uint8
from ..idadapter_core.inv_adapter import EAAReferenceKV, ReferenceTrajectory, ddim_invert, inversion_sigmas
from ..idadapter_core.masks import RegionMask
from ..idadapter_core.presets import check_layout
from ..idadapter_core.schedule import (
    BLOCK_MODES, NEGATIVE_IDENTITY_MODES, StepWindow, adapter_blocks, identity_in_negative, require_finite,
)
from .comfy_binding import (
    LoadedAdapter, active_mask, block_attention, block_index, chunk_rows, describe_model, mask_covers_nothing,
    negative_chunks, step_window,
)
from .comfy_patches import SharedPatch, comfy_attention, set_attention_replace

log = logging.getLogger(__name__)

WRAPPER_KEY = "idadapter_inv_adapter"


FIRST_CONV = "diffusion_model.input_blocks.0.0.weight"
PATCH_SAMPLE = 64
"""Values of each patch tensor that enter the model key: evenly spread, enough to tell two LoRAs or merged checkpoints
apart without hashing every weight at each Invert and Apply."""


def model_key(model) -> str:
    """Names the UNet weights a reference was inverted with, as sampling computes them: the base, a hash of the
    checkpoint's first convolution (cheap, and different for every checkpoint) and, when the MODEL carries weight
    patches (LoRAs, merges, which ComfyUI adds to the weights only while it samples), how many weights they patch
    and a hash of the patches with their strengths. "base:conv" or "base:conv+patches:N:hash"."""
    blocks = describe_model(model)
    first_conv = unpatched_weight(model, FIRST_CONV, model.get_model_object("diffusion_model").input_blocks[0][0].weight)
    key = f"{blocks.layout.base}:{hashlib.sha256(first_conv.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]}"
    patches = getattr(model, "patches", None) or {}
    if not patches:
        return key
    digest = hashlib.sha256()
    for name in sorted(patches):
        digest.update(name.encode())
        _digest_patch(digest, patches[name])
    return f"{key}+patches:{len(patches)}:{digest.hexdigest()[:12]}"


def unpatched_weight(model, name: str, current: torch.Tensor) -> torch.Tensor:
    """The weight `name` as the checkpoint holds it: while a MODEL is loaded for sampling its patches are added in
    place, the original kept in the ModelPatcher's `backup` (shared by its clones)."""
    backup = getattr(model, "backup", {}).get(name)
    return current if backup is None else backup.weight


def _digest_patch(digest, value, depth: int = 0) -> None:
    """Adds one weight patch to `digest`: its strengths, functions and kind, and for each tensor its shape, dtype and
    PATCH_SAMPLE values. Covers ComfyUI's patch tuples (strength_patch, patch, strength_model, offset, function),
    LoRA adapters (objects holding their tensors) and a merge's other checkpoint (lists of (weight, convert))."""
    if depth > 6:
        digest.update(type(value).__name__.encode())
    elif isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // PATCH_SAMPLE)][:PATCH_SAMPLE]
        digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _digest_patch(digest, item, depth + 1)
    elif isinstance(value, dict):
        for name in sorted(value, key=str):
            digest.update(str(name).encode())
            _digest_patch(digest, value[name], depth + 1)
    elif value is None or isinstance(value, (str, int, float, bool)):
        digest.update(repr(value).encode())
    elif callable(value) and hasattr(value, "__qualname__"):
        digest.update(value.__qualname__.encode())
    else:
        digest.update(type(value).__qualname__.encode())
        _digest_patch(digest, {k: v for k, v in vars(value).items() if not isinstance(v, (set, frozenset))}
                      if hasattr(value, "__dict__") else repr(value), depth + 1)


def check_inverted_with(reference: ReferenceTrajectory, applied_key: str) -> None:
    """Refuse a reference inverted through other UNet weights than `applied_key`'s (another checkpoint, or the same one
    with other LoRAs or merges): the reference pass would run through weights the inversion never saw."""
    if reference.model_key == applied_key:
        return
    inverted_base, _, inverted_patches = reference.model_key.partition("+")
    applied_base, _, applied_patches = applied_key.partition("+")
    if inverted_base != applied_base:
        what = "another checkpoint"
    elif not inverted_patches:
        what = f"the plain checkpoint, but it is applied to one with weight patches (LoRA or merge: {applied_patches})"
    elif not applied_patches:
        what = f"a model with weight patches (LoRA or merge: {inverted_patches}), but it is applied to the plain checkpoint"
    else:
        what = "the same checkpoint with other weight patches (other LoRAs or merges, or other strengths)"
    raise IncompatibleWeightsError(
        f"this reference was inverted with {what} (inverted with {reference.model_key}, applied to {applied_key}). "
        "Run Invert Reference through the same MODEL you apply Inv-Adapter to, after the same LoRAs and merges: "
        "connect both to the same MODEL output (e.g. the last LoRA loader's or model merge's)."
    )


def crop_reference_face(image: torch.Tensor, analyzer: FaceAnalyzer, size: int, scale: float) -> torch.Tensor:
    """The largest face of each image, aligned on insightface's template and framed `scale` times the ArcFace crop's
    width, as a (B, size, size, 3) IMAGE."""
    require_finite(crop_scale=scale)
    crops = []
    for index, single in enumerate(image):
        rgb = to_rgb_uint8(single)
        face = detect_face(analyzer, rgb, index, min_face_size=0)
        if isinstance(face, str):
            raise IDAdapterError(f"reference image {index + 1}/{len(image)}: {face}. Use a photo with a visible face, or "
                                 "disconnect face_analysis to invert the whole image.")
        crop = align_reference(rgb, face, analyzer.arcface_size, clip_crop_size=size, clip_crop_scale=scale).clip_crop
        crops.append(torch.from_numpy(np.ascontiguousarray(crop)).float() / 255.0)
    return torch.stack(crops)


def invert_reference(model, vae, clip, image: torch.Tensor, steps: int, progress=None) -> ReferenceTrajectory:
    """DDIM-invert the image (VAE-encoded) with the model and the null prompt ("")."""
    null = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = vae.encode(image[:, :, :, :3])
    sigmas = inversion_sigmas(model.get_model_object("model_sampling").sigmas, steps)
    captured: dict[str, torch.Tensor] = {}
    trajectory: list[torch.Tensor] = []

    def capture_conditioning(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if not captured:
            captured["c_crossattn"] = c_crossattn[:1].detach().to(comfy.model_management.intermediate_device())
            for name in ("y",):
                if name in kwargs:
                    captured[name] = kwargs[name][:1].detach().to(comfy.model_management.intermediate_device())
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def inversion_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        ones = x.new_ones([x.shape[0]])

        def denoise(x, sigma):
            return model_k(x, sigma * ones, **(extra_args or {}))

        def step(done, total):
            if progress is not None:
                progress(done, total)

        points = ddim_invert(denoise, x, sigmas, on_step=step)
        trajectory.append(points.to(comfy.model_management.intermediate_device()))
        return points[-1]

    inverting = model.clone()
    inverting.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, capture_conditioning)
    comfy.sample.sample_custom(
        inverting, torch.zeros_like(latent), 1.0, comfy.samplers.KSAMPLER(inversion_sampler), sigmas, null, null, latent,
        disable_pbar=True,
    )
    return ReferenceTrajectory(sigmas, trajectory[0].float(), captured, model_key(model))


def references_as_tokens(features: torch.Tensor) -> torch.Tensor:
    """One block's features of R reference images (R, T, C) as one set of R·T tokens (1, R·T, C): several photos of
    one person give the EAA more keys and values to attend to (its self-attention appends them all, its
    cross-attention attends over all of them), and every image of the generation batch sees all of them."""
    return features.reshape(1, -1, features.shape[-1])


class _ReferencePassDone(Exception):
    """Raised by the recording patch once every block the EAA needs is recorded: ends the reference pass early."""


@dataclass
class _Bank:
    references: dict[int, EAAReferenceKV] | None = None
    """The EAA's projections of the current step's reference features (None: the EAA is off this step)."""


class InvAdapterPatch(SharedPatch):
    """The state shared by the wrapper and the attention replaces of one Apply Inv-Adapter. Unless
    `identity_in_negative`, the EAA acts only on the positive chunks of a CFG batch: the negative ones are exactly
    the model without the reference (guidance over the identity)."""

    def __init__(self, adapter: LoadedAdapter, reference: ReferenceTrajectory, weight: float, window: StepWindow,
                 first_block: tuple[int, ...], reference_sigma: float | None, cache_features: bool,
                 region: RegionMask | None = None, identity_in_negative: bool = False,
                 blocks: frozenset[int] | None = None) -> None:
        self.adapter = adapter
        self.blocks = frozenset(range(len(adapter.model.blocks))) if blocks is None else blocks
        """The transformer blocks the EAA acts in (forward order); the reference pass stops after the last of them."""
        self.open_self_gates = frozenset(i for i, block in enumerate(adapter.model.blocks) if bool(block.self_gate != 0))
        """Blocks whose self-attention branch adds something: a closed one leaves the block's own attention exactly
        ComfyUI's (an untrained adapter changes nothing, bit for bit)."""
        self.identity_in_negative = identity_in_negative
        self.region = region
        self.reference = reference
        self.weight = weight
        self.window = window
        self.first_block = first_block
        self.reference_sigma = reference_sigma
        self.cache_features = cache_features
        self.bank = _Bank()
        self._features: dict[tuple, dict[int, torch.Tensor]] = {}
        self._recording: dict[int, torch.Tensor] | None = None

    def record(self, n, context_attn1, value_attn1, extra_options):
        """attn1_patch of the reference pass: keep the self-attention input of the blocks the EAA acts in, and end the
        pass once the last of them is recorded (the rest of the UNet would compute nothing the EAA uses)."""
        index = block_index(self.first_block, extra_options)
        if index in self.blocks:
            self._recording[index] = n
            if len(self._recording) == len(self.blocks):
                raise _ReferencePassDone
        return n, context_attn1, value_attn1

    def apply_model_wrapper(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        sigmas = transformer_options.get("sigmas", t)
        only_negative = not self.identity_in_negative and all(negative_chunks(transformer_options) or (False,))
        if self.weight == 0 or only_negative or not self.window.contains(sigmas):
            self.bank.references = None
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        self.bank.references = self.step_references(executor, x, float(sigmas.detach().max()), transformer_options)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.bank.references = None

    def step_references(self, executor, x: torch.Tensor, sigma: float, transformer_options: dict) -> dict[int, EAAReferenceKV]:
        """The EAA's projections of the reference features at noise level `sigma`, per block it acts in."""
        return self.references_of(self._reference_features(executor, x, sigma, transformer_options))

    def references_of(self, features: dict[int, torch.Tensor]) -> dict[int, EAAReferenceKV]:
        blocks = self.adapter.model.blocks
        with torch.no_grad():
            return {index: blocks[index].reference_kv(feature) for index, feature in features.items()}

    def recorded_features(self, run: Callable[[dict], object]) -> dict[int, torch.Tensor]:
        """The self-attention inputs of the EAA's blocks in `run(patches)`, a UNet call with these `patches`; the call
        ends once the last of them is recorded."""
        self._recording = {}
        try:
            with torch.no_grad():
                run({"attn1_patch": [self.record]})
        except _ReferencePassDone:
            pass
        finally:
            recorded, self._recording = self._recording, None
        return {block: references_as_tokens(recorded[block]) for block in sorted(self.blocks)}

    def _reference_features(self, executor, x: torch.Tensor, sigma: float, transformer_options: dict) -> dict[int, torch.Tensor]:
        reference = self.reference
        index = reference.index_for(sigma, self.reference_sigma)
        key = (index, x.device, x.dtype)
        if key in self._features:
            return self._features[key]
        latent = reference.latents[index].to(x)
        sigma_ref = reference.sigmas[index].to(x).expand(latent.shape[0])
        conditioning = {name: value.to(x.device).expand(latent.shape[0], *value.shape[1:])
                        for name, value in reference.conditioning.items()}
        options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        options.update(sigmas=sigma_ref, cond_or_uncond=[1])
        context = conditioning.pop("c_crossattn")
        features = self.recorded_features(
            lambda patches: executor(latent, sigma_ref, None, context, None, dict(options, patches=patches), **conditioning)
        )
        if self.cache_features:
            self._features[key] = features
        return features

    def to(self, device_or_dtype):
        """Cached features stay where the UNet is: moving it elsewhere (offloading) drops those on other devices."""
        if isinstance(device_or_dtype, torch.device):
            device = torch.device(device_or_dtype)
            for key in [k for k in self._features if k[1].type != device.type or (device.index is not None and k[1] != device)]:
                del self._features[key]
        return self

    def models(self) -> list:
        return [self.adapter.patcher]

    def cleanup(self) -> None:
        self.bank.references = None
        if self.region is not None:
            self.region.clear()


def runs_own_attention(inner, extra_options: dict) -> bool:
    """Whether the block's own self-attention is ComfyUI's own, whichever kernel it picked: no other patch chained
    (`inner` is ComfyUI's attention), no attention override. There the EAA's kernel gives the own part of the rows it
    acts on (the same attention; on CPU PyTorch's flash attention with its log-sum-exp,
    `idadapter_core.attention.attention_with_lse`, 1e-6 apart from ComfyUI's sub-quadratic kernel in float32), so
    those rows are not attended twice; elsewhere ComfyUI computes the own part (as chained patches need it) and the
    EAA the change only. The rows it does not act on always get ComfyUI's own attention, so they stay exactly the
    unpatched model's."""
    return inner is comfy_attention and "optimized_attention_override" not in extra_options


class EAAAttention(SharedPatch):
    """An attn1 (`cross=False`) or attn2 replace patch (comfy_patches.ReplacePatch) adding the EAA to that attention
    in every block; `inner` (whatever computed the block's attention before: another pack's patch or ComfyUI's own)
    still computes the block's own part."""

    def __init__(self, patch: InvAdapterPatch, cross: bool) -> None:
        self.patch = patch
        self.cross = cross

    def __call__(self, q, k, v, extra_options, inner):
        references = self.patch.bank.references
        mask = None if references is None else active_mask(self.patch.region, q, extra_options)
        if mask is None:
            return inner(q, k, v, extra_options)
        split = None if self.patch.identity_in_negative else chunk_rows(extra_options, q.shape[0], q.device)
        rows, others = (None, None) if split is None else split
        if rows is not None and rows.numel() == 0:
            return inner(q, k, v, extra_options)
        index = block_index(self.patch.first_block, extra_options)
        if index not in references:
            return inner(q, k, v, extra_options)
        block = self.patch.adapter.model.blocks[index]
        attend = functools.partial(
            block.cross_attention if self.cross else block.self_attention,
            ref=references[index], heads=extra_options["n_heads"], weight=self.patch.weight,
            attention=block_attention(q.device, extra_options),
        )
        mask_values = None if mask.is_full else mask.values
        own_from_kernel = (not self.cross and mask_values is None and index in self.patch.open_self_gates
                           and runs_own_attention(inner, extra_options))
        inner_own = None if own_from_kernel else (lambda q, k, v, heads: inner(q, k, v, extra_options))
        if rows is None:
            return attend(q, k, v, own_attention=inner_own, mask=mask_values)
        # Guidance over the identity: the negative rows keep the block's own output, the EAA runs on the others only.
        pick = functools.partial(torch.index_select, dim=0, index=rows)
        if own_from_kernel:  # the positive rows' own part comes with the EAA's kernel: ComfyUI's runs on the others
            own = inner(*(t.index_select(0, others) for t in (q, k, v)), extra_options)
            own = own.new_empty(q.shape[0], *own.shape[1:]).index_copy_(0, others, own)
        else:
            own = inner(q, k, v, extra_options)
            inner_own = lambda *_: pick(own)  # noqa: E731
        if mask_values is not None and mask_values.shape[0] > 1:
            mask_values = pick(mask_values)
        added = attend(pick(q), pick(k), pick(v), own_attention=inner_own, mask=mask_values)
        return own.index_copy(0, rows, added)

    def to(self, device_or_dtype):
        self.patch.to(device_or_dtype)
        return self

    def models(self) -> list:
        return self.patch.models()


def apply_inv_adapter(model, adapter: LoadedAdapter, reference: ReferenceTrajectory, weight: float, start_at: float,
                      end_at: float, reference_timestep: int = -1, cache_features: bool = True,
                      mask: torch.Tensor | None = None, negative_identity: str = NEGATIVE_IDENTITY_MODES[0],
                      blocks_mode: str = BLOCK_MODES[0]):
    """A clone of MODEL running the reference pass and the EAA (confined to `mask` when given, scaled by its value;
    on CFG's negative half too only with `negative_identity` = "same as positive"; in the blocks of `blocks_mode`);
    the input MODEL is untouched."""
    in_negative = identity_in_negative(negative_identity)
    region = None if mask is None else RegionMask(mask)
    blocks = describe_model(model)
    check_layout(adapter.config.layout, blocks.layout, adapter.name, method="Inv-Adapter")
    check_inverted_with(reference, model_key(model))
    require_finite(weight=weight)
    window = step_window(model, start_at, end_at)
    model_sampling = model.get_model_object("model_sampling")
    reference_sigma = None if reference_timestep < 0 else float(model_sampling.sigmas[min(reference_timestep, len(model_sampling.sigmas) - 1)])
    patch = InvAdapterPatch(adapter, reference, weight, window, blocks.first_block, reference_sigma, cache_features,
                            region, in_negative, adapter_blocks(blocks.layout, blocks_mode))
    patched = model.clone()
    if mask_covers_nothing(region, "Apply Inv-Adapter"):
        return patched
    self_attention, cross_attention = EAAAttention(patch, cross=False), EAAAttention(patch, cross=True)
    for key in blocks.replace_keys:
        set_attention_replace(patched, "attn1", key, self_attention)
        set_attention_replace(patched, "attn2", key, cross_attention)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, patch.apply_model_wrapper)
    return patched
