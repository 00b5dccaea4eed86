"""What Inv-Adapter costs: the inversion, and a generation step with the EAA against one without.

One process, the full SD1.5 UNet layout with random weights (fp32, CPU, eval, no_grad), latents of --size pixels
(512 by default), batch 2 (cond + uncond, as CFG runs them) with 77 text tokens, a batch-1 reference, and the
`sd15` Inv-Adapter with its self-attention gates open and a non-zero cross branch. Two hosts:
- default: a diffusers `UNet2DConditionModel` with `DiffusersInvAdapter` (PyTorch SDPA attention);
- `--host` (needs COMFYUI_PATH): ComfyUI's own `UNetModel` with the pack's ComfyUI binding (the attention replaces and
  the recording patch), under ComfyUI's default CPU attention (sub-quadratic) — where users run it.

Reported:
- inversion: UNet evaluations (= steps) and seconds per evaluation (batch 1), so 50 steps cost 50 x that;
- s/step with the EAA ÷ without: "cold" runs the reference pass (a batch-1 UNet call recording every block's
  self-attention input) and the EAA step; "cached" reuses the step's recorded features (a second generation with the
  same reference); interleaved rounds, median of per-round ratios; goal cached <= 1.5;
- the FLOP floor of both (`torch.utils.flop_counter`, 2 x MACs; host mode counts only the diffusers run);
- memory of the cached features: per step and for a whole generation, fp32 and fp16.
Run: `python bench/inv_adapter_cost.py [--quick] [--host] [--size 512] [--rounds 3]`. Prints a table, exits 0.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from bench.step_overhead import SD15_UNET, Variant, instrumented, interleaved_times  # noqa: E402
from idadapter_core.hosts import DiffusersInvAdapter, diffusers_denoiser, layout_from_diffusers_unet  # noqa: E402
from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig, ddim_invert, inversion_sigmas  # noqa: E402

log = logging.getLogger("inv_adapter_cost")


def open_adapter(layout, seed: int = 0) -> InvAdapter:
    torch.manual_seed(seed)
    adapter = InvAdapter(InvAdapterConfig(layout)).eval()
    with torch.no_grad():
        for block in adapter.blocks:
            block.self_gate.fill_(0.7)
            torch.nn.init.normal_(block.cross_v.weight, std=0.02)
    return adapter


def median_ratio(times: dict[str, list[float]], name: str, base: str = "base") -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def diffusers_run(args) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(SD15_UNET, sample_size=args.size // 8)).eval()
    adapter = open_adapter(layout_from_diffusers_unet(unet))
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
    return dict(host="diffusers (SDPA)", times=times, flops=flops, per_evaluation=per_evaluation, features=features)


def comfy_run(args) -> dict:
    """The same measurement through ComfyUI's UNet and the pack's ComfyUI binding."""
    import importlib

    from bench.comfy_host import import_pack, start_comfyui

    start_comfyui()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    import_pack()
    binding = importlib.import_module("comfyui_idadapter.nodes.inv_adapter_binding")
    comfy_binding = importlib.import_module("comfyui_idadapter.nodes.comfy_binding")
    comfy_patches = importlib.import_module("comfyui_idadapter.nodes.comfy_patches")
    schedule = importlib.import_module("comfyui_idadapter.idadapter_core.schedule")
    inv = importlib.import_module("comfyui_idadapter.idadapter_core.inv_adapter")

    unet_config = dict(image_size=args.size // 8, in_channels=4, model_channels=320, out_channels=4,
                       num_res_blocks=[2, 2, 2, 2], channel_mult=(1, 2, 4, 4), num_heads=8, use_spatial_transformer=True,
                       transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                       transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768,
                       use_linear_in_transformer=False)  # ComfyUI's SD1.5 UNet
    torch.manual_seed(0)
    unet = UNetModel(**unet_config, operations=comfy.ops.disable_weight_init).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.copy_(torch.randn_like(p) * 0.02 if p.ndim > 1 else torch.ones_like(p) if "norm" in name else torch.zeros_like(p))
    blocks = comfy_binding.describe_unet(unet)
    torch.manual_seed(0)
    model = inv.InvAdapter(inv.InvAdapterConfig(blocks.layout)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.self_gate.fill_(0.7)
            torch.nn.init.normal_(block.cross_v.weight, std=0.02)
    adapter = comfy_binding.LoadedAdapter(model, None, "bench", "")
    reference = inv.ReferenceTrajectory(torch.tensor([1.0]), torch.zeros(1, 1, 4, 1, 1), {}, "bench")
    window = schedule.StepWindow(float("inf"), 0.0)
    patch = binding.InvAdapterPatch(adapter, reference, 1.0, window, blocks.first_block, None, True)
    chained = {name: comfy_patches.ChainedReplace(binding.EAAAttention(patch, name == "attn2"), comfy_patches.comfy_attention)
               for name in ("attn1", "attn2")}
    replaces = {name: {key: replace for key in blocks.replace_keys} for name, replace in chained.items()}
    g = torch.Generator().manual_seed(1)
    latent = args.size // 8
    x, ref = torch.randn(2, 4, latent, latent, generator=g), torch.randn(1, 4, latent, latent, generator=g)
    context, null = torch.randn(2, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])

    def record() -> list[torch.Tensor]:
        patch._recording = {}
        unet(ref, t[:1], null, transformer_options={"patches": {"attn1_patch": [patch.record]}})
        features, patch._recording = [patch._recording[i] for i in range(len(patch._recording))], None
        return features

    features = record()
    references = model.blocks.reference_kv(features)

    def base() -> None:
        unet(x, t, context, transformer_options={})

    def cached() -> None:
        patch.bank.references = references
        unet(x, t, context, transformer_options={"patches_replace": replaces})

    def cold() -> None:
        patch.bank.references = model.blocks.reference_kv(record())
        unet(x, t, context, transformer_options={"patches_replace": replaces})

    with torch.no_grad():
        times = interleaved_times([Variant(fn.__name__, fn) for fn in (base, cached, cold)], args.rounds, 1)
        start = time.perf_counter()
        for _ in range(args.inversion_steps):
            unet(ref, t[:1], null, transformer_options={})
        per_evaluation = (time.perf_counter() - start) / args.inversion_steps
    return dict(host="ComfyUI (default CPU attention)", times=times, flops=None, per_evaluation=per_evaluation,
                features=features)


def report(result: dict, args) -> str:
    times, flops = result["times"], result["flops"]
    per_step = sum(f.numel() for f in result["features"])
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
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.rounds = 256, 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    result = comfy_run(args) if args.host else diffusers_run(args)
    print(report(result, args))


if __name__ == "__main__":
    main()
