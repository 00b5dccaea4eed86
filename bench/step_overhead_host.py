"""What Apply IDAdapter costs per KSampler step inside a real ComfyUI (step_overhead.py measures it in diffusers).

One worker process per attention kernel (ComfyUI picks it at import): ComfyUI's default on CPU (sub-quadratic) and
`--use-pytorch-cross-attention` (PyTorch SDPA, the kernel of the diffusers measurement). In each, ComfyUI's own SD1.5
UNet with random weights (loaded through `comfy.sd.load_diffusion_model_state_dict`, so ComfyUI picks its dtype and
ops as for a checkpoint), random text conditioning, a 512² latent (one image: cond + uncond make the UNet batch 2),
euler, cfg 7, and `comfy.sample.sample` (what KSampler runs) with a callback timing each step. The first step of a
run is not timed (it loads the models and computes E_r's K/V). Variants, interleaved round by round:
    base     the MODEL without Apply
    fp16     Apply IDAdapter (weight 1, every block) with an fp16 weights file
    fp32     the same with an fp32 file
    fast     fp16 file, blocks = "skip highest resolution" (our faster mode)
    kv-only  fp16 file, weight 0 with the K/V at full strength (paper form): only the per-step K/V path
    masked   fp16 file with a mask covering the left half of the image (the adapter's residual scaled by the mask,
             the cross-attention run with and without the K/V differences and blended): compared with fp16
    inv-cold   Apply Inv-Adapter (weight 1, open gates, non-zero cross branch, guided: the EAA on the cond row),
               cache_features off: the reference pass at every step, what every first generation costs
    inv-cached the same with cache_features on, after a warm-up generation: a later generation of the same graph
    inv-fast   inv-cold with blocks = "skip highest resolution" (Inv-Adapter's faster mode)
    gligen     ComfyUI's own GLIGEN (GLIGENTextboxApply's conditioning: one box over the whole image) with random
               weights and open gates: the native gated self-attention our IDAdapter adapter has the form of (its
               30 grounding tokens against IDAdapter's 1025 reference tokens), in every block and both CFG halves
    before-* the pack at --before (e.g. `git archive e13f01c`), same files: the host before this change
The sd15 adapter has random weights, both gates of every block opened and random K/V differences; E_r is random,
1025 tokens (4 references x 256 patches + 1). Inv-Adapter's reference is a random trajectory of 10 inversion
steps at the generation's size (the reference pass cost does not depend on its content). The FLOP floor is counted on one UNet call with and without the
adapter (`torch.utils.flop_counter`, 2 x MACs) in the worker that runs ComfyUI's default kernel.
Run: `COMFYUI_PATH=... python -m bench.step_overhead_host [--attention default,pytorch] [--variants ...]
[--before PATH] [--rounds 3] [--json PATH]`; prints a table and exits 0.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.comfy_host import REPO_ROOT, fill_random, import_pack, random_sd15_unet, start_comfyui
from bench.common import count_flops
from train.real_size_models import open_idadapter, open_inv_adapter

ATTENTION_MODES = {"default": [], "pytorch": ["use_pytorch_cross_attention"]}
INV_ADAPTER_FILE = "bench-sd15-inv.safetensors"

log = logging.getLogger("step_overhead.host")


def write_weights_files(folder: Path, gate: float = 0.5) -> dict[str, str]:
    """The sd15 adapter with random weights, open gates and random K/V differences, as fp16 and fp32 files."""
    from idadapter_core import IDAdapter, IDAdapterConfig, save_idadapter

    torch.manual_seed(0)
    adapter = open_idadapter(IDAdapter(IDAdapterConfig.for_base("sd15")), gate, kv_std=0.01)
    files = {}
    for dtype in ("fp16", "fp32"):
        files[dtype] = f"bench-sd15-{dtype}.safetensors"
        save_idadapter(folder / files[dtype], adapter, dtype=torch.float16 if dtype == "fp16" else torch.float32)
    return files


def write_inv_adapter_file(folder: Path) -> str:
    """The sd15 Inv-Adapter with random weights, open gates and a non-zero cross branch, as an fp32 file."""
    from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig, save_inv_adapter
    from idadapter_core.presets import get_preset

    torch.manual_seed(0)
    save_inv_adapter(folder / INV_ADAPTER_FILE, open_inv_adapter(InvAdapter(InvAdapterConfig(get_preset("sd15")))))
    return INV_ADAPTER_FILE


def inv_adapter_variants(pack, model, folder: str, latent: int, prefix: str) -> dict:
    """Apply Inv-Adapter on `model` with a random 10-step reference trajectory: cold, cached and (where the pack has
    it) the faster mode."""
    import comfy.model_management
    import folder_paths

    nodes = importlib.import_module(f"{pack.__name__}.nodes.inv_adapter_nodes")
    binding = importlib.import_module(f"{pack.__name__}.nodes.inv_adapter_binding")
    inversion = importlib.import_module(f"{pack.__name__}.idadapter_core.inv_adapter")
    folder_paths.add_model_folder_path("inv_adapter", folder, is_default=True)
    adapter = nodes.LoadInvAdapter.execute(INV_ADAPTER_FILE).result[0]
    g = torch.Generator().manual_seed(2)
    sigmas = inversion.inversion_sigmas(model.get_model_object("model_sampling").sigmas, 10)
    reference = inversion.ReferenceTrajectory(
        sigmas, torch.randn(len(sigmas), 1, 4, latent, latent, generator=g),
        {"c_crossattn": torch.randn(1, 77, 768, generator=g).to(comfy.model_management.intermediate_device())},
        binding.model_key(model),
    )
    inputs = {i.id for i in nodes.ApplyInvAdapter.GET_SCHEMA().inputs}

    def apply(**options):
        return nodes.ApplyInvAdapter.execute(model, adapter, reference, 1.0, 0.0, 1.0, **options).result[0]

    variants = {f"{prefix}inv-cold": apply(cache_features=False), f"{prefix}inv-cached": apply(cache_features=True)}
    if "blocks" in inputs:
        variants[f"{prefix}inv-fast"] = apply(cache_features=False, blocks="skip highest resolution")
    return variants


def gligen_positive(positive: list, latent: int, gate: float = 0.5) -> list:
    """`positive` with ComfyUI's native GLIGEN on it, as GLIGENTextboxApply sets it (one box over the whole latent,
    a random pooled text embedding), the GLIGEN model built as `comfy.gligen.load_gligen` builds SD1.5's: a gated
    self-attention + gated GEGLU feed-forward per transformer block (forward order) and the box encoder."""
    import comfy.gligen
    import comfy.model_management
    import comfy.model_patcher

    from idadapter_core.presets import get_preset

    torch.manual_seed(3)
    fusers = [comfy.gligen.GatedSelfAttentionDense(channels, 768, 8, channels // 8)
              for channels in get_preset("sd15").block_channels]
    gligen = fill_random(comfy.gligen.Gligen(fusers, comfy.gligen.PositionNet(768, 768), 768))
    with torch.no_grad():
        for fuser in fusers:
            fuser.alpha_attn.fill_(gate)
            fuser.alpha_dense.fill_(gate)
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(gligen, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    box = (torch.randn(1, 768), latent, latent, 0, 0)  # (pooled text, height, width, y, x) in latent units
    return [[cond, {**options, "gligen": ("position", patcher, [box])}] for cond, options in positive]


def nodes_of(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.idadapter_nodes")


def build_sd15_model(seed: int = 0):
    """ComfyUI's SD1.5 UNet with finite random weights, as a MODEL (ModelPatcher) loaded as a checkpoint's is."""
    import comfy.sd

    unet = random_sd15_unet(seed=seed)
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    del unet
    return comfy.sd.load_diffusion_model_state_dict(state)


def worker(args: argparse.Namespace) -> dict:
    """Everything measured under one attention kernel, in this process."""
    start_comfyui(*ATTENTION_MODES[args.attention])
    import comfy.sample
    import folder_paths
    from comfy.ldm.modules import attention as comfy_attention

    pack_modules = {"": import_pack()}
    if args.before:
        pack_modules["before-"] = import_pack(Path(args.before), "comfyui_idadapter_before")
    packs = {prefix: nodes_of(pack) for prefix, pack in pack_modules.items()}
    folder_paths.add_model_folder_path("idadapter", args.weights_dir, is_default=True)
    files = json.loads(args.files)

    model = build_sd15_model()
    latent = torch.zeros(1, 4, args.latent, args.latent)
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    noise = comfy.sample.prepare_noise(latent, 0)

    variants = {"base": model}
    for prefix, nodes in packs.items():
        apply_inputs = {i.id for i in nodes.ApplyIDAdapter.GET_SCHEMA().inputs}
        for dtype, file_name in files.items():
            adapter = nodes.LoadIDAdapter.execute(file_name).result[0]
            # the pack's own class: Apply IDAdapter checks the type, and the repository's `idadapter_core` on sys.path
            # is another module than the pack's
            identity_embeds = importlib.import_module(f"{pack_modules[prefix].__name__}.idadapter_core").IdentityEmbeds
            embeds = identity_embeds(
                torch.randn(1, args.tokens, adapter.config.mff.width, generator=g),
                {"l": torch.randn(1, 768, generator=g)}, adapter.fingerprint, adapter.name,
            )

            def apply(**options):
                return nodes.ApplyIDAdapter.execute(model, adapter, embeds, options.pop("weight", 1.0), 0.0, 1.0,
                                                    **options).result[0]

            variants[f"{prefix}{dtype}"] = apply()
            if dtype == "fp16" and "blocks" in apply_inputs and not prefix:
                variants["fast"] = apply(blocks="skip highest resolution")
                variants["kv-only"] = apply(weight=0.0, cross_attention_kv="full strength (paper)")
            if dtype == "fp16" and "mask" in apply_inputs and not prefix:
                left_half = torch.zeros(1, args.latent * 8, args.latent * 8)
                left_half[..., : args.latent * 4] = 1.0
                variants["masked"] = apply(mask=left_half)
    wanted = args.variants.split(",")
    for prefix, pack in pack_modules.items():
        if any(name.startswith(f"{prefix}inv-") for name in wanted):
            variants.update(inv_adapter_variants(pack, model, args.weights_dir, args.latent, prefix))
    positives = {}
    if "gligen" in wanted:
        variants["gligen"] = model
        positives["gligen"] = gligen_positive(positive, args.latent)
    variants = {name: m for name, m in variants.items() if name in wanted}

    def run(name: str) -> list[float]:
        marks = [time.perf_counter()]
        comfy.sample.sample(variants[name], noise, args.steps, 7.0, "euler", "normal", positives.get(name, positive),
                            negative, latent, seed=0, callback=lambda *_: marks.append(time.perf_counter()),
                            disable_pbar=True)
        return [b - a for a, b in zip(marks[1:], marks[2:])]  # the first step loads models and E_r's K/V

    times: dict[str, list[list[float]]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(args.warmup + args.rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            steps = run(name)
            if index >= args.warmup:
                times[name].append(steps)
        log.info("%s attention, round %d/%d: %s", args.attention, index + 1 - args.warmup, args.rounds,
                 ", ".join(f"{n} {statistics.median(t[-1]) if t else float('nan'):.2f} s" for n, t in times.items()))
    result = dict(attention=args.attention, kernel=comfy_attention.optimized_attention.__name__,
                  latent=args.latent, tokens=args.tokens, steps=args.steps, rounds=args.rounds, times=times)
    if args.flops:
        counted = ("base", "fp32", "fast", "fp16", "masked")
        result["flops"] = model_call_flops({name: variants[name] for name in counted if name in variants}, latent,
                                      positive, negative)
    return result


def model_call_flops(variants: dict, latent: torch.Tensor, positive, negative) -> dict[str, int]:
    """FLOPs of one CFG-batched model call (2 x MACs; elementwise ops not counted), E_r's K/V cached. PyTorch's CPU
    SDPA kernel, which the adapter runs on CPU, is counted with PyTorch's SDPA formula (the counter has none)."""
    import comfy.model_management

    out = {}
    x = torch.randn(2, *latent.shape[1:])
    context = torch.cat([positive[0][0], negative[0][0]])
    sigmas = torch.full((2,), 5.0)
    for name, model in variants.items():
        comfy.model_management.load_models_gpu([model])
        options = {**model.model_options["transformer_options"], "sigmas": sigmas}
        with torch.no_grad():
            model.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=options)  # fills caches
            out[name] = count_flops(lambda: model.model.apply_model(x, sigmas, c_crossattn=context,
                                                                    transformer_options=options))
    return out


def per_round_ratio(times: dict, name: str, baseline: str = "base") -> list[float]:
    return [statistics.median(a) / statistics.median(b) for a, b in zip(times[name], times[baseline])]


def summarize(results: list[dict]) -> str:
    lines = []
    for result in results:
        times = result["times"]
        lines.append(f"\n{result['attention']} attention ({result['kernel']}): latent {result['latent']}² "
                     f"({result['latent'] * 8}² px), batch 2 (CFG), E_r {result['tokens']} tokens, {result['steps'] - 1} "
                     f"timed steps x {result['rounds']} rounds")
        if "flops" in result and "fp32" in result["flops"]:
            floor = result["flops"]["fp32"] / result["flops"]["base"]
            lines.append(f"  FLOP floor (E_r K/V cached): {floor:.3f}  (base {result['flops']['base'] / 1e9:.1f} GFLOPs)")
            if "fast" in result["flops"]:
                lines.append(f"  FLOP floor of the faster mode: {result['flops']['fast'] / result['flops']['base']:.3f}")
        if "flops" in result and {"masked", "fp16"} <= result["flops"].keys():
            lines.append(f"  FLOPs with a mask ÷ without: {result['flops']['masked'] / result['flops']['fp16']:.4f}")
        if not result["rounds"]:
            continue
        base = statistics.median(s for run in times["base"] for s in run)
        lines.append(f"  base         {base:6.2f} s/step")
        for name in times:
            if name == "base":
                continue
            ratios = per_round_ratio(times, name)
            seconds = statistics.median(s for run in times[name] for s in run)
            lines.append(f"  {name:<12} {seconds:6.2f} s/step   ÷ base {statistics.median(ratios):.3f} "
                         f"[{min(ratios):.2f}-{max(ratios):.2f}]")
        if "masked" in times and "fp16" in times:
            ratios = per_round_ratio(times, "masked", "fp16")
            lines.append(f"  with a mask ÷ without (fp16): {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]")
    return "\n".join(lines)


def run_host(argv: list[str] | None = None) -> int:
    """Parent: writes the weights files, runs one worker per attention mode, prints the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.step_overhead_host", description=__doc__.split("\n")[0])
    parser.add_argument("--attention", default="default,pytorch", help="comma list of: default, pytorch")
    parser.add_argument("--variants", default="base,fp16,fp32,fast,kv-only,masked,inv-cold,inv-cached,inv-fast,gligen,"
                                              "before-fp16,before-fp32,before-inv-cold")
    parser.add_argument("--before", help="a checkout of the pack to compare with (before-* variants)")
    parser.add_argument("--latent", type=int, default=64, help="latent size (64: 512² px)")
    parser.add_argument("--tokens", type=int, default=1025, help="E_r length (1025: 4 references x 256 + 1)")
    parser.add_argument("--steps", type=int, default=3, help="steps per KSampler run; the first is not timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("--host needs COMFYUI_PATH pointing at a ComfyUI checkout")
    results = []
    with tempfile.TemporaryDirectory(prefix="idadapter-bench-") as folder:
        files = write_weights_files(Path(folder))
        write_inv_adapter_file(Path(folder))
        for index, attention in enumerate(args.attention.split(",")):
            out = Path(folder) / f"{attention}.json"
            command = [sys.executable, "-m", "bench.step_overhead_host", "--worker", "--attention", attention, "--weights-dir", folder,
                       "--files", json.dumps(files), "--variants", args.variants, "--latent", str(args.latent),
                       "--tokens", str(args.tokens), "--steps", str(args.steps), "--rounds", str(args.rounds),
                       "--warmup", str(args.warmup), "--out", str(out)]
            if args.before:
                command += ["--before", str(Path(args.before).resolve())]
            if index == 0:
                command.append("--flops")
            subprocess.run(command, check=True, cwd=REPO_ROOT)
            results.append(json.loads(out.read_text()))
    print(summarize(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.step_overhead_host --worker")
    for name in ("--attention", "--weights-dir", "--files", "--variants", "--before", "--out"):
        parser.add_argument(name)
    for name in ("--latent", "--tokens", "--steps", "--rounds", "--warmup"):
        parser.add_argument(name, type=int)
    parser.add_argument("--flops", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    Path(args.out).write_text(json.dumps(worker(args)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # one attention mode, started by run_host
        worker_main(argv[1:])
        return 0
    return run_host(argv)


if __name__ == "__main__":
    sys.exit(main())
