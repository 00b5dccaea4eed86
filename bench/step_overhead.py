"""What the IDAdapter visual adapter costs per UNet step, against the arithmetic floor of its design.

One process, a diffusers `UNet2DConditionModel` in the full SD1.5 layout with random weights (fp32, CPU, eval,
no_grad), batch 2 (cond + uncond, as CFG runs them) with 77 text tokens, and `IDAdapter` for `sd15` with its gates
opened, attached with `DiffusersIDAdapter`. E_r is random (1, T, 1024): the MFF encoder runs once per generation and
is no part of the step, and neither is `set_identity` (each block's K/V of E_r, computed once), timed separately.
E_r lengths: the paper's (4 references x 256 patches + 1 = 1025 tokens) and a short one.

(a) measured ratio, step with adapter ÷ step without: interleaved (base, adapter@T1, adapter@T2, order rotated
    every round) after warm-up rounds; per-round ratios, median (and, as a cross-check against bursts of load
    from other processes, the ratio of the fastest runs).
(b) FLOP floor: `torch.utils.flop_counter` FLOPs (2 x MACs; elementwise ops not counted) of one step with the
    adapter ÷ one without. CPU SDPA is counted with PyTorch's own SDPA formula (the counter has no entry for the
    CPU kernel). Also shown: the floor if E_r's K/V were recomputed every step for every batch item (GLIGEN does).
(c) per-block: our fast path `block(y, reference_kv)` against `gligen_forward(block, y, E_r)` (GLIGEN's
    form: attention over all of [y, E_r], keep y's rows), on the 16 blocks' real token counts, summed over the
    blocks, interleaved, median ratio; plus the fast path recomputing E_r's K/V on every call (which isolates what
    "queries from y only" saves), the FLOP ratio, and the largest difference between the two outputs.
Memory: adapter parameters (blocks + cross-attention K/V deltas; MFF and identity-token MLP do not run per step),
    E_r's cached K/V (kept per generation), and the step's peak extra: the peak of live tensor storages allocated
    during a step with the adapter minus that without, counted exactly by a TorchDispatchMode that adds each new
    storage's bytes and subtracts them when it is freed (allocator caching and fragmentation are not included).

Goals: (a) <= 1.1 x (b); (c) <= 0.85; extra memory (parameters + K/V cache + step peak) <= adapter size + 5 %.
Prints a table with PASS/MISS per goal and exits 0 (it is a report).
Run: `python -m bench.step_overhead [--quick] [--json PATH]` (full: about 10 minutes on 2 cores).

`bench/step_overhead_host.py` (needs COMFYUI_PATH) measures the same adapter where users run it: KSampler steps
in a real ComfyUI with and without Apply IDAdapter, fp16 and fp32 weights files, ComfyUI's default CPU attention
and `--use-pytorch-cross-attention`, the faster mode and the per-step K/V path, and optionally the pack before a
change (`--before PATH`). Run: `COMFYUI_PATH=... python -m bench.step_overhead_host [--rounds 3] [--json PATH]`.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from bench.common import (
    MB, SD15_UNET, Instrumented, Variant, instrumented, interleaved_times, print_and_write, ratios, timed, verdict,
)
from bench.gligen_reference import gligen_forward
from idadapter_core import IDAdapter, IDAdapterConfig
from idadapter_core.hosts import DiffusersIDAdapter, transformer_blocks_in_forward_order
from train.real_size_models import open_idadapter

log = logging.getLogger("step_overhead")

ADAPTER_CONFIG = IDAdapterConfig.for_base("sd15")
PAPER_TOKENS = ADAPTER_CONFIG.num_ref_tokens
GOAL_WASTE = 1.1
GOAL_VS_NAIVE = 0.85
GOAL_MEMORY = 1.05


# ---- models and inputs -------------------------------------------------------------------------------------------

def build_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**SD15_UNET).eval()


def build_adapter(gate: float = 0.5) -> IDAdapter:
    """Full-size sd15 adapters with random weights and both gates of every block opened."""
    return open_idadapter(IDAdapter(ADAPTER_CONFIG), gate)


def per_step_parameter_bytes(adapter: IDAdapter) -> int:
    """Blocks and cross-attention K/V deltas: the parts that take part in every step."""
    return sum(p.numel() * p.element_size() for part in (adapter.blocks, adapter.cross_kv) for p in part.parameters())


@dataclass
class StepInputs:
    latents: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor

    @classmethod
    def random(cls, unet: nn.Module, settings: "Settings", generator: torch.Generator) -> "StepInputs":
        batch, size, config = settings.batch, settings.latent, unet.config
        return cls(
            torch.randn(batch, config.in_channels, size, size, generator=generator),
            torch.full((batch,), 500),
            torch.randn(batch, settings.text_tokens, config.cross_attention_dim, generator=generator),
        )


def unet_step(unet: nn.Module, inputs: StepInputs) -> torch.Tensor:
    return unet(inputs.latents, inputs.timesteps, encoder_hidden_states=inputs.context).sample


@contextmanager
def recording_token_counts(unet: nn.Module) -> Iterator[list[int]]:
    """The visual token count of every transformer block, in forward order, in the UNet calls inside `with`."""
    counts: list[int] = []

    def hook(module, args, kwargs):
        counts.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in transformer_blocks_in_forward_order(unet)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


# ---- the three measurements -------------------------------------------------------------------------------------

@dataclass
class Settings:
    latent: int
    ref_tokens: tuple[int, ...]
    rounds: int
    warmup: int
    batch: int = 2
    text_tokens: int = 77
    threads: int = field(default_factory=torch.get_num_threads)


@dataclass
class IdentityCost:
    """`set_identity`: once per generation."""

    seconds: float
    flops: int
    cache_bytes: int


@dataclass
class StepResult:
    tokens: int
    seconds: list[float]
    ratios: list[float]
    flops: int
    peak_extra_bytes: int
    identity: IdentityCost

    @property
    def measured(self) -> float:
        return statistics.median(self.ratios)


@dataclass
class StepReport:
    base_seconds: list[float]
    base_flops: int
    base_peak_bytes: int
    token_counts: list[int]
    adapters: list[StepResult]


def identity_cost(binding: DiffusersIDAdapter, e_r: torch.Tensor, repeats: int = 3) -> IdentityCost:
    cost = instrumented(lambda: binding.set_identity(e_r))
    seconds = statistics.median(timed(lambda: binding.set_identity(e_r)) for _ in range(repeats))
    return IdentityCost(seconds, cost.flops, cost.retained_bytes)


def step_benchmark(unet: nn.Module, adapter: IDAdapter, e_rs: dict[int, torch.Tensor], settings: Settings,
                   inputs: StepInputs) -> StepReport:
    def step() -> torch.Tensor:
        return unet_step(unet, inputs)

    binding = DiffusersIDAdapter(unet, adapter)
    binding.detach()
    log.info("instrumented step without the adapter (FLOPs, memory, token counts)")
    with recording_token_counts(unet) as token_counts:
        base = instrumented(step)
    instrumented_steps: dict[int, tuple[Instrumented, IdentityCost]] = {}
    for tokens, e_r in e_rs.items():
        log.info("instrumented step with the adapter, E_r of %d tokens", tokens)
        binding.attach()
        identity = identity_cost(binding, e_r)
        instrumented_steps[tokens] = (instrumented(step), identity)

    def with_identity(e_r: torch.Tensor) -> Callable[[], None]:
        def prepare() -> None:
            binding.attach()
            binding.set_identity(e_r)
        return prepare

    variants = [Variant("base", step, binding.detach)]
    variants += [Variant(f"E_r {tokens}", step, with_identity(e_r)) for tokens, e_r in e_rs.items()]
    times = interleaved_times(variants, settings.rounds, settings.warmup)
    binding.detach()
    adapters = [
        StepResult(tokens, times[f"E_r {tokens}"], ratios(times[f"E_r {tokens}"], times["base"]), step.flops,
                   step.peak_bytes - base.peak_bytes, identity)
        for tokens, (step, identity) in instrumented_steps.items()
    ]
    return StepReport(times["base"], base.flops, base.peak_bytes, list(token_counts), adapters)


@dataclass
class BlockResult:
    tokens: int
    ours_seconds: list[float]
    ours_recomputing_kv_seconds: list[float]
    naive_seconds: list[float]
    ours_flops: int
    ours_recomputing_kv_flops: int
    naive_flops: int
    max_abs_diff: float
    max_abs_residual: float

    @property
    def measured(self) -> float:
        return statistics.median(ratios(self.ours_seconds, self.naive_seconds))

    @property
    def measured_recomputing_kv(self) -> float:
        return statistics.median(ratios(self.ours_recomputing_kv_seconds, self.naive_seconds))

    @property
    def predicted(self) -> float:
        return self.ours_flops / self.naive_flops

    @property
    def predicted_recomputing_kv(self) -> float:
        return self.ours_recomputing_kv_flops / self.naive_flops


def block_benchmark(adapter: IDAdapter, token_counts: list[int], e_r: torch.Tensor, settings: Settings,
                    generator: torch.Generator) -> BlockResult:
    blocks = list(adapter.blocks)
    ys = [torch.randn(settings.batch, tokens, block.norm1.normalized_shape[0], generator=generator)
          for block, tokens in zip(blocks, token_counts)]
    kvs = adapter.blocks.reference_kv(e_r)

    def ours() -> None:
        for block, y, kv in zip(blocks, ys, kvs):
            block(y, kv)

    def ours_recomputing_kv() -> None:
        for block, y in zip(blocks, ys):
            block(y, block.reference_kv(e_r))

    def naive() -> None:
        for block, y in zip(blocks, ys):
            gligen_forward(block, y, e_r)

    max_abs_diff = max_abs_residual = 0.0
    for block, y, kv in zip(blocks, ys, kvs):
        reference = gligen_forward(block, y, e_r)
        max_abs_diff = max(max_abs_diff, (block(y, kv) - reference).abs().max().item())
        max_abs_residual = max(max_abs_residual, (reference - y).abs().max().item())
    flops = {fn.__name__: instrumented(fn).flops for fn in (ours, ours_recomputing_kv, naive)}
    times = interleaved_times([Variant(fn.__name__, fn) for fn in (ours, ours_recomputing_kv, naive)],
                              settings.rounds, settings.warmup)
    return BlockResult(e_r.shape[1], times["ours"], times["ours_recomputing_kv"], times["naive"], flops["ours"],
                       flops["ours_recomputing_kv"], flops["naive"], max_abs_diff, max_abs_residual)


def run_benchmark(unet: nn.Module, adapter: IDAdapter, settings: Settings, seed: int = 0) -> dict:
    """All measurements for a UNet and an adapter that fit it; the summary `print_table` shows."""
    generator = torch.Generator().manual_seed(seed)
    load_before = os.getloadavg()[0]
    inputs = StepInputs.random(unet, settings, generator)
    width = adapter.config.mff.width
    e_rs = {tokens: torch.randn(1, tokens, width, generator=generator) for tokens in settings.ref_tokens}
    with torch.no_grad():
        steps = step_benchmark(unet, adapter, e_rs, settings, inputs)
        blocks = []
        for tokens, e_r in e_rs.items():
            log.info("per-block comparison with the naive form, E_r of %d tokens", tokens)
            blocks.append(block_benchmark(adapter, steps.token_counts, e_r, settings, generator))
    summary = summarize(settings, steps, blocks, per_step_parameter_bytes(adapter))
    summary["load_average_1min"] = [load_before, os.getloadavg()[0]]
    return summary


# ---- report ------------------------------------------------------------------------------------------------------

def summarize(settings: Settings, steps: StepReport, blocks: list[BlockResult], parameter_bytes: int) -> dict:
    """Every number the table shows, per E_r length, with the goals judged."""
    per_tokens = []
    for step, block in zip(steps.adapters, blocks):
        floor = step.flops / steps.base_flops
        floor_recomputing = (step.flops + settings.batch * step.identity.flops) / steps.base_flops
        extra_bytes = parameter_bytes + step.identity.cache_bytes + max(step.peak_extra_bytes, 0)
        per_tokens.append(dict(
            tokens=step.tokens,
            step_seconds_median=statistics.median(step.seconds),
            a_measured_ratio=step.measured, a_ratio_range=[min(step.ratios), max(step.ratios)],
            a_fastest_ratio=min(step.seconds) / min(steps.base_seconds),
            b_flop_floor=floor, b_flop_floor_recomputing_kv=floor_recomputing,
            naive_flop_floor=(step.flops - block.ours_flops + block.naive_flops) / steps.base_flops,
            a_over_b=step.measured / floor, goal_a=verdict(step.measured <= GOAL_WASTE * floor),
            c_measured_ratio=block.measured, c_fastest_ratio=min(block.ours_seconds) / min(block.naive_seconds),
            c_measured_ratio_recomputing_kv=block.measured_recomputing_kv,
            c_flop_ratio_recomputing_kv=block.predicted_recomputing_kv,
            c_flop_ratio=block.predicted, goal_c=verdict(block.measured <= GOAL_VS_NAIVE),
            max_abs_diff_vs_naive=block.max_abs_diff, max_abs_adapter_residual=block.max_abs_residual,
            identity_seconds=step.identity.seconds, identity_gflops=step.identity.flops / 1e9,
            kv_cache_bytes=step.identity.cache_bytes, step_peak_extra_bytes=step.peak_extra_bytes,
            memory_ratio=extra_bytes / parameter_bytes, goal_memory=verdict(extra_bytes <= GOAL_MEMORY * parameter_bytes),
            memory_ratio_without_cache=(extra_bytes - step.identity.cache_bytes) / parameter_bytes,
            block_seconds=dict(ours=block.ours_seconds, ours_recomputing_kv=block.ours_recomputing_kv_seconds,
                               naive=block.naive_seconds),
            step_seconds=step.seconds,
        ))
    return dict(
        settings=asdict(settings), torch=torch.__version__, block_token_counts=steps.token_counts,
        base_step_seconds=steps.base_seconds, base_step_seconds_median=statistics.median(steps.base_seconds),
        base_gflops=steps.base_flops / 1e9, base_peak_bytes=steps.base_peak_bytes,
        adapter_parameter_bytes=parameter_bytes, results=per_tokens,
    )


def print_table(summary: dict) -> None:
    s = summary["settings"]
    results = summary["results"]
    size = s["latent"]
    print(f"\nIDAdapter step overhead: SD1.5 UNet layout, random weights, fp32 CPU ({s['threads']} threads), batch "
          f"{s['batch']} (CFG), {s['text_tokens']} text tokens, latents {size}x{size} ({size * 8}² px); "
          f"{s['rounds']} interleaved rounds after {s['warmup']} warm-up, medians. Load average (1 min) before/after: "
          f"{summary['load_average_1min'][0]:.1f}/{summary['load_average_1min'][1]:.1f} on {os.cpu_count()} CPUs.")
    print(f"Step without adapter: {summary['base_step_seconds_median']:.2f} s, {summary['base_gflops']:.1f} GFLOPs. "
          f"Blocks' visual tokens: {sorted(set(summary['block_token_counts']), reverse=True)}.\n")
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("step with adapter (s)", lambda r: f"{r['step_seconds_median']:.2f}"),
        ("(a) measured with ÷ without [range]",
         lambda r: f"{r['a_measured_ratio']:.3f} [{r['a_ratio_range'][0]:.2f}-{r['a_ratio_range'][1]:.2f}]"),
        ("    fastest with ÷ fastest without", lambda r: f"{r['a_fastest_ratio']:.3f}"),
        ("(b) FLOP floor, E_r K/V once per generation", lambda r: f"{r['b_flop_floor']:.3f}"),
        ("    FLOP floor, E_r K/V every step", lambda r: f"{r['b_flop_floor_recomputing_kv']:.3f}"),
        ("    FLOP floor, naive form", lambda r: f"{r['naive_flop_floor']:.3f}"),
        (f"goal (a) <= {GOAL_WASTE} x (b): (a) ÷ (b)", lambda r: f"{r['a_over_b']:.3f} {r['goal_a']}"),
        ("(c) ours ÷ naive, measured", lambda r: f"{r['c_measured_ratio']:.3f}"),
        ("    fastest ours ÷ fastest naive", lambda r: f"{r['c_fastest_ratio']:.3f}"),
        ("    ours recomputing K/V ÷ naive, measured",
         lambda r: f"{r['c_measured_ratio_recomputing_kv']:.3f} (FLOPs {r['c_flop_ratio_recomputing_kv']:.3f})"),
        ("    ours ÷ naive, FLOPs", lambda r: f"{r['c_flop_ratio']:.3f}"),
        (f"goal (c) <= {GOAL_VS_NAIVE}", lambda r: f"{r['c_measured_ratio']:.3f} {r['goal_c']}"),
        ("max |ours - naive| (max |residual|)",
         lambda r: f"{r['max_abs_diff_vs_naive']:.1e} ({r['max_abs_adapter_residual']:.1f})"),
        ("set_identity, once per generation", lambda r: f"{r['identity_seconds']:.2f} s, {r['identity_gflops']:.1f} GFLOPs"),
        ("adapter parameters (MB)", lambda r: f"{summary['adapter_parameter_bytes'] / MB:.1f}"),
        ("E_r K/V cache, per generation (MB)", lambda r: f"{r['kv_cache_bytes'] / MB:.1f}"),
        ("step peak extra allocations (MB)", lambda r: f"{r['step_peak_extra_bytes'] / MB:.1f}"),
        ("(parameters + step extra) ÷ parameters", lambda r: f"{r['memory_ratio_without_cache']:.3f}"),
        (f"goal memory <= {GOAL_MEMORY} x parameters, all three",
         lambda r: f"{r['memory_ratio']:.3f} {r['goal_memory']}"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    print(" " * width + "".join(f"{'E_r ' + str(r['tokens']) + ' tokens':>28}" for r in results))
    for label, cell in rows:
        print(f"{label:<{width}}" + "".join(f"{cell(r):>28}" for r in results))
    print("\nFLOPs = 2 x MACs from torch.utils.flop_counter (elementwise ops not counted). Where the FLOP ratio of (c) "
          f"is above {GOAL_VS_NAIVE}, no implementation of this design can meet goal (c). Memory = bytes of tensor "
          "storages allocated by ops, tracked until freed (no allocator overhead); the memory goal counts parameters "
          "+ E_r K/V cache + the step's extra peak.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32x32 latents and 3 rounds: a couple of minutes")
    parser.add_argument("--latent", type=int, help="latent size (default 64, i.e. 512 px; 32 with --quick)")
    parser.add_argument("--short-tokens", type=int, default=64, help="length of the short E_r (default 64)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    args = parse_args(argv)
    settings = Settings(
        latent=args.latent or (32 if args.quick else 64),
        ref_tokens=(PAPER_TOKENS, args.short_tokens),
        rounds=args.rounds or (3 if args.quick else 5),
        warmup=args.warmup,
    )
    torch.manual_seed(0)
    log.info("building the SD1.5 UNet and the sd15 adapter (random weights)")
    summary = run_benchmark(build_unet(), build_adapter(), settings)
    print_and_write(summary, print_table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
