"""What Inv-Adapter costs: the inversion, and a generation step with the EAA against one without.

One process, the full SD1.5 UNet layout with random weights (fp32, CPU, eval, no_grad), latents of --size pixels
(512 by default), batch 2 (cond + uncond, as CFG runs them) with 77 text tokens, a batch-1 reference, and the
`sd15` Inv-Adapter with its self-attention gates open and a non-zero cross branch. Two hosts:
- default: a diffusers `UNet2DConditionModel` with `DiffusersInvAdapter` (PyTorch SDPA attention);
- `--host` (needs COMFYUI_PATH): ComfyUI's own `UNetModel` with the pack's ComfyUI binding, called as a sampler calls it
  (cond + uncond chunks: the EAA on the cond row, guidance over the identity), under ComfyUI's default CPU attention
  or `--attention pytorch`; the step split into its parts (reference pass, self EAA, cross EAA, cached, cold, the
  faster mode), several checkouts side by side (`--packs before=PATH,after=.`), `--flops` counted on fake tensors
  (no arithmetic runs, so 512² and 768² count in minutes) and `--rounds 0` for FLOPs only.

Reported:
- inversion (diffusers host): UNet evaluations (= steps) and seconds per evaluation (batch 1), so 50 steps cost 50 x that;
- s/step with the EAA ÷ without: "cold" runs the reference pass (a batch-1 UNet call recording every block's
  self-attention input) and the EAA step; "cached" reuses the step's recorded features (a second generation with the
  same reference); interleaved rounds, median of per-round ratios; goal cached <= 1.5;
- the FLOP floor of both (`torch.utils.flop_counter`, 2 x MACs; in host mode with `--flops`);
- memory of the cached features: per step and for a whole generation, fp32 and fp16.
Run: `python -m bench.inv_adapter_cost [--quick] [--size 512] [--rounds 3] [--json PATH]`, or `COMFYUI_PATH=...
python -m bench.inv_adapter_cost --host [--attention pytorch] [--flops] [--rounds 0] [--packs ...]`. Prints a table,
exits 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.common import (
    REPO_ROOT, SD15_UNET, Variant, count_flops, instrumented, interleaved_times, median_ratio, ratios,
)
from idadapter_core.hosts import DiffusersInvAdapter, diffusers_denoiser, layout_from_diffusers_unet
from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig, ddim_invert, inversion_sigmas
from train.real_size_models import open_inv_adapter

log = logging.getLogger("inv_adapter_cost")


def diffusers_run(args) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(SD15_UNET, sample_size=args.size // 8)).eval()
    torch.manual_seed(0)
    adapter = open_inv_adapter(InvAdapter(InvAdapterConfig(layout_from_diffusers_unet(unet))))
    g = torch.Generator().manual_seed(1)
    latent = args.size // 8
    x, ref = torch.randn(2, 4, latent, latent, generator=g), torch.randn(1, 4, latent, latent, generator=g)
    context, null = torch.randn(2, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    t = 500
    binding = DiffusersInvAdapter(unet, adapter)
    features = binding.record_reference(ref, t, null)
    binding.set_reference(features)

    def base() -> None:
        binding.weight = 0.0
        unet(x, t, encoder_hidden_states=context)

    def cached() -> None:
        binding.weight = 1.0
        unet(x, t, encoder_hidden_states=context)

    def cold() -> None:
        binding.weight = 1.0
        binding.set_reference(binding.record_reference(ref, t, null))
        unet(x, t, encoder_hidden_states=context)

    with torch.no_grad():
        flops = {fn.__name__: instrumented(fn).flops for fn in (base, cached, cold)}
        times = interleaved_times([Variant(fn.__name__, fn) for fn in (base, cached, cold)], args.rounds, 1)
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        denoise, schedule = diffusers_denoiser(unet, scheduler.alphas_cumprod, "epsilon", null)
        sigmas = inversion_sigmas(schedule, args.inversion_steps)
        start = time.perf_counter()
        ddim_invert(denoise, ref, sigmas)
        per_evaluation = (time.perf_counter() - start) / args.inversion_steps
    binding.detach()
    return dict(host="diffusers (SDPA)", times=times, flops=flops, per_evaluation=per_evaluation,
                feature_elements=sum(f.numel() for f in features))


def comfy_run(args) -> dict:
    """The same measurement through ComfyUI's UNet and the pack's ComfyUI binding, as a sampler calls it (cond and
    uncond chunks, `cond_or_uncond` = [0, 1]: the EAA acts on the positive row only, guidance over the identity),
    split into its parts: the reference pass alone, the EAA's self-attention (appended K/V) alone, its decoupled
    cross-attention alone. `--packs name=PATH,...` measures several checkouts of the pack side by side."""
    import importlib

    from bench.comfy_host import import_pack, random_sd15_unet, start_comfyui

    start_comfyui(*(["use_pytorch_cross_attention"] if args.attention == "pytorch" else []))
    from comfy.ldm.modules import attention as comfy_attention

    unet = random_sd15_unet(args.size // 8)
    g = torch.Generator().manual_seed(1)
    latent = args.size // 8
    real = dict(x=torch.randn(2, 4, latent, latent, generator=g), ref=torch.randn(1, 4, latent, latent, generator=g),
                context=torch.randn(2, 77, 768, generator=g), null=torch.randn(1, 77, 768, generator=g),
                t=torch.tensor([500.0, 500.0]))
    inputs = dict(real)
    """What the variants run on: `real`, or fake tensors of the same shapes to count FLOPs without computing."""
    sampler_options = {"cond_or_uncond": [0, 1]}

    def base() -> None:
        unet(inputs["x"], inputs["t"], inputs["context"], transformer_options=dict(sampler_options))

    variants, flops = [Variant("base", base)], {}
    for pack_name, path in args.packs.items():
        module = f"comfyui_idadapter_{pack_name}"
        import_pack(Path(path).resolve(), module)
        binding = importlib.import_module(f"{module}.nodes.inv_adapter_binding")
        comfy_binding = importlib.import_module(f"{module}.nodes.comfy_binding")
        comfy_patches = importlib.import_module(f"{module}.nodes.comfy_patches")
        schedule = importlib.import_module(f"{module}.idadapter_core.schedule")
        inv = importlib.import_module(f"{module}.idadapter_core.inv_adapter")
        blocks = comfy_binding.describe_unet(unet)
        torch.manual_seed(0)
        model = open_inv_adapter(inv.InvAdapter(inv.InvAdapterConfig(blocks.layout)))
        adapter = comfy_binding.LoadedAdapter(model, None, "bench", "")
        reference = inv.ReferenceTrajectory(torch.tensor([1.0]), real["ref"][None], {"c_crossattn": real["null"]}, "bench")
        object.__setattr__(reference, "index_for", lambda *_: 0)  # one point; no look-up on fake tensors
        patch = binding.InvAdapterPatch(adapter, reference, 1.0, schedule.StepWindow(float("inf"), 0.0),
                                        blocks.first_block, None, cache_features=False)
        chained = {name: comfy_patches.ChainedReplace(binding.EAAAttention(patch, name == "attn2"),
                                                      comfy_patches.comfy_attention) for name in ("attn1", "attn2")}

        def options(*attentions: str) -> dict:
            return dict(sampler_options, patches_replace={a: {key: chained[a] for key in blocks.replace_keys}
                                                          for a in attentions})

        def record(patch=patch) -> list[torch.Tensor]:
            """The reference pass as the APPLY_MODEL wrapper runs it, through an executor that calls the UNet."""
            def executor(latent, sigma, c_concat, c_crossattn, control, transformer_options, **kwargs):
                return unet(inputs["ref"], inputs["t"][:1], inputs["null"], transformer_options=transformer_options)
            if hasattr(patch, "step_references"):
                return patch.step_references(executor, inputs["x"], 1.0, dict(sampler_options))
            return model.blocks.reference_kv(patch._reference_features(executor, inputs["x"], 1.0, dict(sampler_options)))

        with torch.no_grad():
            references = record()

        def step(*attentions: str, patch=patch, references=references, options=options) -> Callable[[], None]:
            def run() -> None:
                patch.bank.references = references
                unet(inputs["x"], inputs["t"], inputs["context"], transformer_options=options(*attentions))
            return run

        def cold(patch=patch, record=record, options=options) -> None:
            patch.bank.references = record()
            unet(inputs["x"], inputs["t"], inputs["context"], transformer_options=options("attn1", "attn2"))

        parts = {"reference pass": record, "self EAA": step("attn1"), "cross EAA": step("attn2"),
                 "cached": step("attn1", "attn2"), "cold": cold}
        if hasattr(patch, "blocks"):  # the faster mode: the EAA and the reference pass end below the highest resolution
            fast = binding.InvAdapterPatch(adapter, reference, 1.0, schedule.StepWindow(float("inf"), 0.0),
                                           blocks.first_block, None, cache_features=False,
                                           blocks=schedule.adapter_blocks(blocks.layout, "skip highest resolution"))
            fast_chained = {name: comfy_patches.ChainedReplace(binding.EAAAttention(fast, name == "attn2"),
                                                               comfy_patches.comfy_attention) for name in ("attn1", "attn2")}

            def fast_cold(fast=fast, fast_chained=fast_chained, blocks=blocks) -> None:
                def executor(latent, sigma, c_concat, c_crossattn, control, transformer_options, **kwargs):
                    return unet(inputs["ref"], inputs["t"][:1], inputs["null"], transformer_options=transformer_options)
                fast.bank.references = fast.step_references(executor, inputs["x"], 1.0, dict(sampler_options))
                replaces = {a: {key: fast_chained[a] for key in blocks.replace_keys} for a in ("attn1", "attn2")}
                unet(inputs["x"], inputs["t"], inputs["context"], transformer_options=dict(sampler_options, patches_replace=replaces))

            parts["fast cold (skip highest resolution)"] = fast_cold
        parts = {part: run for part, run in parts.items() if not args.parts or part in args.parts.split(",")}
        variants += [Variant(f"{pack_name}: {part}", run) for part, run in parts.items()]
    with torch.no_grad():
        if args.flops:
            with FakeTensorMode(allow_non_fake_inputs=True) as fake:
                inputs.update({name: fake.from_tensor(value) for name, value in real.items()})
                flops = {v.name: count_flops(v.run) for v in variants}
            inputs.update(real)
        times = interleaved_times(variants, args.rounds, 1) if args.rounds else {v.name: [] for v in variants}
    return dict(host=f"ComfyUI ({comfy_attention.optimized_attention.__name__})", times=times, flops=flops)


def breakdown(result: dict, args) -> str:
    """Seconds and FLOPs of each part, as ratios to the base step (median of per-round ratios [min-max])."""
    times, flops = result["times"], result["flops"]
    base = statistics.median(times["base"]) if times["base"] else float("nan")
    lines = [f"Inv-Adapter parts, {result['host']}, SD1.5, {args.size}², batch 2 (cond + uncond, EAA on cond), "
             f"{args.rounds} rounds; base step {base:.2f} s" + (f", {flops['base'] / 1e9:.0f} GFLOPs" if flops else "")]
    for name in times:
        if name == "base":
            continue
        row = ratios(times[name], times["base"]) or [float("nan")]
        extra = ""
        if flops:
            extra = f"   FLOPs ÷ base {flops[name] / flops['base']:.3f}"
        lines.append(f"  {name:<28} time ÷ base {statistics.median(row):.3f} [{min(row):.2f}-{max(row):.2f}]{extra}")
    return "\n".join(lines)


def report(result: dict, args) -> str:
    times, flops = result["times"], result["flops"]
    per_step = result["feature_elements"]
    lines = [
        f"Inv-Adapter cost, {result['host']}, SD1.5 layout, {args.size}x{args.size}, batch 2 + reference 1, "
        f"{args.rounds} rounds",
        f"  base step                      {statistics.median(times['base']):7.2f} s",
        f"  cached: EAA step ÷ base        {median_ratio(times, 'cached'):7.3f}   (goal <= 1.5: "
        f"{'PASS' if median_ratio(times, 'cached') <= 1.5 else 'MISS'})",
        f"  cold: reference pass + EAA     {median_ratio(times, 'cold'):7.3f}",
    ]
    if flops:
        lines += [f"  FLOP floor cached / cold       {flops['cached'] / flops['base']:7.3f} / {flops['cold'] / flops['base']:.3f}"
                  f"   (base {flops['base'] / 1e9:.0f} GFLOPs)"]
    lines += [
        f"  inversion                      1 UNet evaluation (batch 1) per step: {result['per_evaluation']:.2f} s; "
        f"50 steps = {50 * result['per_evaluation']:.0f} s",
        f"  cached features per reference  {per_step * 4 / 1e6:.1f} MB per step in fp32 ({per_step * 2 / 1e6:.1f} MB fp16); "
        f"{per_step * 4 * args.generation_steps / 1e9:.2f} GB for {args.generation_steps} steps in fp32",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inversion-steps", type=int, default=2, help="inversion steps actually timed")
    parser.add_argument("--generation-steps", type=int, default=30, help="steps a cached generation keeps features for")
    parser.add_argument("--host", action="store_true", help="measure in ComfyUI (COMFYUI_PATH) instead of diffusers")
    parser.add_argument("--quick", action="store_true", help="256x256, 2 rounds")
    parser.add_argument("--attention", choices=("default", "pytorch"), default="default",
                        help="--host: ComfyUI's default CPU attention or --use-pytorch-cross-attention")
    parser.add_argument("--packs", default=f"this={REPO_ROOT}",
                        help="--host: name=PATH,... checkouts of the pack measured side by side")
    parser.add_argument("--flops", action="store_true", help="--host: also count each variant's FLOPs")
    parser.add_argument("--parts", default="", help="--host: only these parts (comma list; default all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.rounds = 256, 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    if args.host:
        args.packs = dict(item.split("=", 1) for item in args.packs.split(","))
        result = comfy_run(args)
        print(breakdown(result, args))
    else:
        result = diffusers_run(args)
        print(report(result, args))
    if args.json:
        args.json.write_text(json.dumps(dict(result, settings=vars(args)), indent=2, default=str))


if __name__ == "__main__":
    main()
