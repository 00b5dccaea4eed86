"""What the benchmarks share: timing (interleaved rounds, ratios, spread), FLOP and memory counting, and the real
model layouts (SD1.5 / SD2.1 / SDXL UNets, their VAE and text encoders, OpenCLIP ViT-H/14) as diffusers /
transformers / ComfyUI constructor arguments, the UNets' attention widths and heads read from
`idadapter_core.presets`, and the real bases whole (`BASES`, which train/real_size_models.py writes as model
folders)."""
from __future__ import annotations

import json
import logging
import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from idadapter_core.presets import get_preset
from train.config import FitConfig
from train.real_size_models import BaseSpec

log = logging.getLogger("bench")

MB, GIB = 1e6, 2**30
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO_ROOT.parent / "shared" / "assets"
"""The real test assets (photos, insightface stand-in pack) beside the repository, where CI keeps them."""


# ---- timing, ratios, spread -------------------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` runs: on a shared machine other processes only ever add time."""
    return min(timed(fn) for _ in range(repeats))


@dataclass
class Variant:
    name: str
    run: Callable[[], Any]
    prepare: Callable[[], None] = lambda: None
    """Untimed set-up before each timed run (attach/detach the adapter, set E_r)."""


def interleaved_times(variants: list[Variant], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per run of each variant; every round runs each variant once, the order rotated round by round."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for index in range(warmup + rounds):
        shift = index % len(variants)
        measured = index >= warmup
        for variant in variants[shift:] + variants[:shift]:
            variant.prepare()
            seconds = timed(variant.run)
            if measured:
                times[variant.name].append(seconds)
        if measured:
            log.info("round %d/%d: %s", index - warmup + 1, rounds,
                     ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items()))
        else:
            log.info("warm-up round %d/%d done", index + 1, warmup)
    return times


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Round by round: numerator[i] / denominator[i]."""
    return [a / b for a, b in zip(numerator, denominator)]


def median_ratio(times: dict[str, list[float]], name: str, base: str = "base") -> float:
    """The median of the per-round ratios of `name`'s times to `base`'s."""
    return statistics.median(ratios(times[name], times[base]))


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_and_write(summary: dict, print_table: Callable[[dict], None], json_path: Path | None) -> None:
    """How every benchmark ends: its table on stdout, and its summary as JSON at `json_path` when one is given."""
    print_table(summary)
    if json_path:
        json_path.write_text(json.dumps(summary, indent=2))
        log.info("wrote %s", json_path)


def run_seeds(seeds: range, run: Callable[[int], Any], summarize: Callable[[list], dict],
              json_path: Path | None) -> dict:
    """Seed after seed, `run(seed)`; the summary of the seeds done so far is rewritten at `json_path` (when given)
    after every one, so an interrupted run keeps what it finished. Returns the summary of all."""
    results = []
    for seed in seeds:
        results.append(run(seed))
        if json_path:
            json_path.write_text(json.dumps(summarize(results), indent=2))
    return summarize(results)


# ---- FLOPs and memory -------------------------------------------------------------------------------------------

def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}
"""PyTorch's CPU attention kernels, forward and backward, counted with PyTorch's own SDPA formulas (the counter has
no entry for them; on the meta device attention runs as matmuls and is counted as such)."""


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn`: 2 x MACs from `torch.utils.flop_counter` (elementwise ops not counted)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that ops allocate while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage(), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes or key in inputs or key in self._tracked:
            return  # a view, an in-place result or a storage already counted
        self._tracked.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


@dataclass
class Instrumented:
    flops: int
    peak_bytes: int
    retained_bytes: int


def instrumented(fn: Callable[[], Any]) -> Instrumented:
    """FLOPs, peak allocated bytes and bytes still allocated afterwards, of one call of `fn` (result discarded)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_FLOP_FORMULAS) as flops, TensorMemory() as memory:
        fn()
        retained = memory.live
    return Instrumented(flops.get_total_flops(), memory.peak, retained)


# ---- the real layouts -------------------------------------------------------------------------------------------

NUM_REFS = FitConfig.num_refs
"""N = 4 references per sample, the paper's and the trainer's default."""
FACE_ID_WEIGHT = FitConfig.face_id_weight
"""λ = 0.1 of the face-ID loss, the paper's and the trainer's default."""


def _unet_heads(base: str, channels: tuple[int, ...]) -> int | tuple[int, ...]:
    """Heads per UNet level (diffusers' SD name `attention_head_dim`) from the preset's transformer blocks; a level
    without any (SDXL's first) keeps its real config's value, width / 64. One number when all levels agree."""
    preset = get_preset(base)
    by_width = dict(zip(preset.block_channels, preset.block_heads))
    heads = tuple(by_width.get(width, width // 64) for width in channels)
    return heads[0] if len(set(heads)) == 1 else heads


SD_UNET_LEVELS = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
"""SD1.x and SD2.x share their UNet's levels; they differ in text width, heads and projections."""
SD15_UNET = dict(
    SD_UNET_LEVELS, sample_size=64, in_channels=4, out_channels=4,
    attention_head_dim=_unet_heads("sd15", SD_UNET_LEVELS["block_out_channels"]),
    cross_attention_dim=get_preset("sd15").context_dim,
)
SD21_UNET = dict(
    SD_UNET_LEVELS, sample_size=64, in_channels=4, out_channels=4,
    attention_head_dim=_unet_heads("sd21", SD_UNET_LEVELS["block_out_channels"]), use_linear_projection=True,
    cross_attention_dim=get_preset("sd21").context_dim,
)
"""SD2.1-base (512 px, ε); its 768-v twin has the same shapes."""
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=_unet_heads("sdxl", (320, 640, 1280)),
    use_linear_projection=True, cross_attention_dim=get_preset("sdxl").context_dim,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SD15_COMFY_UNET = dict(
    image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2, 2],
    channel_mult=(1, 2, 4, 4), num_heads=_unet_heads("sd15", (320,)), use_spatial_transformer=True,
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=get_preset("sd15").context_dim,
    use_linear_in_transformer=False,
)
"""The SD1.5 UNet as ComfyUI's `UNetModel` builds it from a checkpoint."""
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
"""CLIP ViT-L/14's text encoder (SD1.x, SDXL's first); its activation is quick_gelu."""
OPENCLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                       hidden_act="gelu")
"""OpenCLIP ViT-H/14's text encoder as SD2.x runs it (23 of its 24 layers)."""
OPENCLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280)
"""OpenCLIP ViT-bigG/14's text encoder (SDXL's second)."""
VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                image_size=224, projection_dim=1024)
"""OpenCLIP ViT-H/14's vision tower (IDAdapter's CLIP image encoder) as transformers' `CLIPVisionConfig` kwargs."""
VIT_H_14_OPENCLIP = dict(VIT_H_14, hidden_act="gelu", layer_norm_eps=1e-5)
"""The same with OpenCLIP's activation (gelu; transformers defaults to quick_gelu, which counts the same FLOPs)."""

BASES = {
    "sd15": BaseSpec(SD15_UNET, (dict(CLIP_L_TEXT, hidden_act="quick_gelu"),), SD_VAE, 512),
    "sd21": BaseSpec(SD21_UNET, (OPENCLIP_H_TEXT,), SD_VAE, 512),
    "sdxl": BaseSpec(SDXL_UNET, (dict(CLIP_L_TEXT, hidden_act="quick_gelu"), OPENCLIP_BIGG_TEXT), SD_VAE, 1024),
}
"""The real bases, whole. SD2.1 is SD2.1-base (512 px, ε); its 768-v twin has the same shapes. SDXL is counted on
the meta device by bench/real_scale.py, never built."""
