"""The trainer rehearsed at real model sizes: memory and time measured on the CPU, and projected to GPUs.

Models (random weights, real layouts, written as local folders the trainer loads as it loads real ones): the SD1.5 or
SD2.1-base UNet, VAE and text encoder (diffusers/transformers configs of those models; the text encoder has CLIP's
49,408-token embedding table, the tokenizer is the trainer's tiny one with 77 tokens), OpenCLIP ViT-H/14's vision
tower, and an insightface pack made of the real SCRFD-2.5G detector (../shared/assets) and an IResNet-100 with random
weights exported to ONNX as glintr100.onnx, which the face-ID loss converts with train/onnx_to_torch.py as it does
antelopev2's file. `--quick` swaps in the trainer's tiny models and an IResNet of one block per stage: the same code
paths in seconds (the smoke test).

1. Rehearsal, the trainer's own commands in subprocesses: `prepare` on the four real photos of ../shared/assets/faces
   (two identities), `fit` at the paper's settings (N = 4, λ = 0.1 face-ID loss, gradient checkpointing, bf16 autocast
   when the CPU has bf16 instructions, else fp32) for `--steps` steps; the same run SIGKILLed after its first
   checkpoint and resumed with `--resume latest` must end with the same adapter bytes; `export`; `eval` of one
   identity x one prompt (IDAdapter; `eval` scores IDAdapter weights only). Inv-Adapter too, with DDIM-inverted
   references (`--reference-features inversion`). Each command's wall time and peak RSS are recorded; a command whose
   RSS passes `--memory-cap-gib` is killed and reported as such.
2. Memory of each part (one subprocess per base and method, so its RSS is its own): frozen models and trainable
   parameters (bytes of their tensors), Adam's state (after one step; bitsandbytes' 8-bit Adam too when it imports),
   and the peak RSS above the loaded models during one training step's forward and backward at batch 1 and 2, with
   and without gradient checkpointing, and at 256 px (the resolution scaling); the face-ID loss's VAE decode with
   gradients the same way. fp32 (the CPU's): GPU bf16 numbers are projected with the ratio of saved-for-backward bytes
   counted on the meta device in bf16 and fp32.
3. FLOPs of one training step, counted (`bench.common.count_flops`) on the meta device for SD1.5, SD2.1 and
   SDXL (1024 px), and a full-UNet training step for the utilisation reference (MosaicML's SD2-base UNet throughput on
   A100s, 290 images/s on 8 GPUs at 512 px: github.com/mosaicml/diffusion README).
4. A table: per base, GPU memory and batch, whether it fits with which options, and the projected hours of 50k steps
   x batch 4 on an A100 and an H100 at that utilisation. What was measured and what projected is said in each row.

Run: `python -m bench.real_scale [--quick] [--base sd15] [--methods idadapter inv-adapter] [--json PATH]`.
At full size on a CPU one training step takes minutes (1.5-5 on 2 shared cores, fp32) and the whole run hours, within
~14 GiB of RAM (IDAdapter's fit at 512 px peaked at 12.6 on SD1.5, 13.5 on SD2.1): `--skip rehearsal|parts`,
`--rehearse`, `--fit-resolution` and `--parts-resolution` cut it down, and `--workdir` keeps what was measured for a
later summary. Prints a table and exits 0 (a report), 1 when a rehearsal
step failed or a resumed run did not end where the uninterrupted one did.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from bench.common import BASES, FACE_ID_WEIGHT, NUM_REFS, SHARED_ASSETS, VIT_H_14_OPENCLIP, print_and_write
from bench.real_scale_meta import count_on_meta
from bench.real_scale_parts import measure_parts
from bench.real_scale_run import Settings, bf16_instructions, python, rehearse, run_command
from train.real_size_models import DETECTOR, ModelFolders, write_models

log = logging.getLogger("real_scale")


# ---- 4. projections ----------------------------------------------------------------------------------------------

GPUS = {"A100": 312e12, "H100 SXM": 989e12}
"""Dense bf16 tensor-core peaks, FLOP/s (NVIDIA's A100 and H100 datasheets; H100's 1,979 is with sparsity)."""
REFERENCE_IMAGES_PER_S = 290 / 8
"""MosaicML's SD2-base UNet training at 512 px on 8 A100s (github.com/mosaicml/diffusion README), per GPU."""
CARDS_GIB = (24, 40, 80)
CUDA_OVERHEAD_GIB = 1.0
"""CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack: assumed, not measured (no GPU here)."""
PAPER_STEPS, PAPER_BATCH = 50_000, 4
PROJECTED_BATCHES = (1, 2, 4, 8)


def linear_fit(points: dict[int, float]) -> tuple[float, float]:
    """(intercept, per-sample slope) through the batch sizes measured."""
    batches = sorted(points)
    if len(batches) == 1:
        return 0.0, points[batches[0]] / batches[0]
    slope = (points[batches[-1]] - points[batches[0]]) / (batches[-1] - batches[0])
    return points[batches[0]] - slope * batches[0], slope


def activation_resolution_scale(steps: list[dict], low: int, high: int) -> float:
    """Measured: activations of the batch-1 step with gradient checkpointing at `high` ÷ at `low` (the pixel ratio
    when the step at `high` was not measured)."""
    def activation(resolution: int) -> float | None:
        for s in steps:
            if s["batch"] == 1 and s["gradient_checkpointing"] and s["resolution"] == resolution:
                return s["peak_above_models_gib"] - s["gradients_gib"]
        return None

    at_low, at_high = activation(low), activation(high)
    return at_high / at_low if at_low and at_high else (high / low) ** 2


def utilisation(counted: dict) -> float:
    """Model FLOPs utilisation of MosaicML's measured throughput (their step: the full UNet's forward, backward
    and weight gradients, counted here)."""
    return REFERENCE_IMAGES_PER_S * counted["reference_full_unet_sd21_512"]["gflops"] * 1e9 / GPUS["A100"]


def project(parts: dict, counted: dict, base: str, method: str) -> dict:
    """GPU memory per batch and option set (bf16 autocast: UNet and text encoders in bf16, the rest fp32), from the
    parts measured for `parts`' base, scaled to `base` through the meta counts when they differ (SDXL)."""
    measured_base = parts["base"]
    steps = [s for s in parts["steps"] if "peak_above_models_gib" in s]
    low = [s for s in steps if s["resolution"] == parts["parts_resolution"]]
    own = counted[measured_base][method]
    bf16_ratio = own["bf16"]["saved_gib"] / own["fp32"]["saved_gib"] if parts.get("activation_dtype") != "bf16" else 1.0
    target = counted[base][method]
    base_scale = target["bf16"]["saved_gib"] / own["bf16"]["saved_gib"]
    resolution_scale = activation_resolution_scale(steps, parts["parts_resolution"], parts["resolution"])
    activations = {}
    for checkpointing in (False, True):
        points = {s["batch"]: s["peak_above_models_gib"] - s["gradients_gib"] for s in low
                  if s["gradient_checkpointing"] == checkpointing}
        if points:
            factor = bf16_ratio * resolution_scale * base_scale
            activations[checkpointing] = tuple(v * factor for v in linear_fit(points))
    decode = {}
    pixels = (counted[base]["resolution"] / parts["parts_resolution"]) ** 2
    if not parts["decode"]:  # not measured: the counted saved bytes, no checkpointing (the most it can take)
        decode = dict.fromkeys((False, True), (0.0, counted[base]["decode_saved_gib_fp32"]))
    for checkpointing in ((False, True) if parts["decode"] else ()):
        # a mode not measured takes the other's numbers (said in the summary's `decode_modes_measured`)
        measured = [d for d in parts["decode"] if d["gradient_checkpointing"] == checkpointing] or parts["decode"]
        points = {d["batch"]: d["peak_above_models_gib"] * pixels for d in measured}
        decode[checkpointing] = linear_fit(points) if points else (0.0, 0.0)
    frozen = parts["frozen_gib_fp32"]
    frozen_scale = target["fp32"]["unet_params"] / own["fp32"]["unet_params"]
    text_scale = sum(t["hidden_size"] ** 2 * t["num_hidden_layers"] for t in BASES[base].texts) / sum(
        t["hidden_size"] ** 2 * t["num_hidden_layers"] for t in BASES[measured_base].texts)
    frozen_gib = (frozen["unet"] * frozen_scale + frozen["text_encoders"] * text_scale) / 2 + frozen["vae"] + \
        frozen["clip_vision"] + frozen["face_recognizer"]
    trainable_gib = parts["trainable_gib"] * target["fp32"]["adapter_params"] / own["fp32"]["adapter_params"]
    optimizer = parts["optimizer"]
    adam_per_gib = {"adam": optimizer["adam_state_gib"] / parts["trainable_gib"]}
    if "adam8bit_state_gib" in optimizer:
        adam_per_gib["adam8bit"] = optimizer["adam8bit_state_gib"] / parts["trainable_gib"]
    rows = []
    for optimizer_name, per_gib in adam_per_gib.items():
        for checkpointing in (True, False):
            if checkpointing not in activations:
                continue
            static = frozen_gib + trainable_gib * (2 + per_gib) + CUDA_OVERHEAD_GIB
            act, dec = activations[checkpointing], decode[checkpointing]
            gib = {b: static + act[0] + act[1] * b + (dec[0] + dec[1] * b if method == "idadapter" else 0.0)
                   for b in PROJECTED_BATCHES}
            largest = {card: max([b for b in range(1, 65) if static + act[0] + act[1] * b +
                                  (dec[0] + dec[1] * b if method == "idadapter" else 0.0) <= card], default=0)
                       for card in CARDS_GIB}
            rows.append(dict(base=base, method=method, optimizer=optimizer_name,
                             gradient_checkpointing=checkpointing, static_gib=static, gib_per_batch=gib,
                             largest_batch=largest, activation_gib_per_sample=act[1],
                             measured=base == measured_base))
    return dict(rows=rows, bf16_over_fp32_activations=bf16_ratio, frozen_gib=frozen_gib, trainable_gib=trainable_gib)


def hours(counted: dict, base: str, method: str, mfu: float) -> dict:
    """50k steps x batch 4 at `mfu` of each GPU's peak: the step's FLOPs (adapter step + the face-ID gate's decode
    forward of every sample; a decode with gradients for the samples showing a face adds up to 3x that)."""
    entry = counted[base]
    per_sample = entry[method]["bf16"]["gflops"] + (entry["decode_gflops"] if method == "idadapter" else 0.0)
    total = per_sample * 1e9 * PAPER_STEPS * PAPER_BATCH
    return {gpu: total / (peak * mfu) / 3600 for gpu, peak in GPUS.items()} | {"gflops_per_sample": per_sample}


def summarize(settings: Settings, rehearsal: dict, parts: dict, counted: dict) -> dict:
    mfu = utilisation(counted)
    projections, times = {}, {}
    for method in settings.methods:
        if "frozen_gib_fp32" not in parts.get(method, {}):
            continue
        measured = dict(parts[method], base=settings.base, resolution=settings.resolution,
                        parts_resolution=settings.parts_resolution)
        for base in BASES:
            projections[f"{base}/{method}"] = project(measured, counted, base, method)
            times[f"{base}/{method}"] = hours(counted, base, method, mfu)
    commands = rehearsal.get("commands", [])
    return dict(settings=asdict(settings), torch=torch.__version__, cpu_bf16=bf16_instructions(),
                rehearsal=dict(commands=commands, resume_exact=rehearsal.get("resume_exact", {}),
                               losses_finite=rehearsal.get("losses_finite")),
                parts=parts, counted=counted, utilisation=mfu, projections=projections, hours=times,
                load_average_1min=os.getloadavg()[0])


def print_table(summary: dict) -> None:
    s = summary["settings"]
    print(f"\nReal-size rehearsal: {s['base']}, fit at {s['fit_resolution']} px, batch {s['batch_size']}, N = {NUM_REFS}, "
          f"λ = {FACE_ID_WEIGHT}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, mixed "
          f"precision '{s['mixed_precision']}' (CPU bf16 instructions: {summary['cpu_bf16']}), {s['threads']} "
          f"thread(s), torch {summary['torch']}{', QUICK (tiny models)' if s['quick'] else ''}.\n")
    print(f"{'command':<52}{'seconds':>9}{'peak RSS GiB':>14}{'exit':>6}  note")
    for c in summary["rehearsal"]["commands"]:
        print(f"{c['name']:<52}{c['seconds']:>9.0f}{c['peak_rss_gib']:>14.2f}{c['returncode']:>6}  {c['stopped']}")
    print(f"resume exact (same adapter bytes as the uninterrupted run): {summary['rehearsal']['resume_exact']}; "
          f"losses finite: {summary['rehearsal']['losses_finite']}")
    for method, p in summary["parts"].items():
        if "frozen_gib_fp32" not in p:
            print(f"\n{method}: parts not measured ({p.get('error', '?')})")
            continue
        print(f"\n{method}, parts measured on the CPU in fp32 ({s['base']}):")
        print("  frozen GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in p["frozen_gib_fp32"].items()))
        o = p["optimizer"]
        print(f"  trainable: {p['trainable_params'] / 1e6:.1f} M parameters, {p['trainable_gib']:.2f} GiB (+ the "
              f"same in gradients); Adam state {o['adam_state_gib']:.2f} GiB; 8-bit Adam "
              + (f"{o['adam8bit_state_gib']:.2f} GiB (bitsandbytes {o['bitsandbytes']})" if "adam8bit_state_gib" in o
                 else o["bitsandbytes"]))
        for step in p["steps"]:
            what = f"  step b{step['batch']} {step['resolution']} px gc={'on ' if step['gradient_checkpointing'] else 'off'}"
            if "peak_above_models_gib" in step:
                print(f"{what}: +{step['peak_above_models_gib']:.2f} GiB over the models (of which gradients "
                      f"{step['gradients_gib']:.2f}), {step['seconds']:.0f} s, loss {step['loss']:.4f}")
            else:
                print(f"{what}: {step['skipped']}")
        for d in p["decode"]:
            print(f"  face-ID decode with gradients b{d['batch']} gc={'on ' if d['gradient_checkpointing'] else 'off'}: "
                  f"+{d['peak_above_models_gib']:.2f} GiB, {d['seconds']:.0f} s")
    c = summary["counted"]
    print("\nCounted on the meta device (GFLOPs per sample of the adapter step, fwd+bwd; saved activations GiB, bf16):")
    for base in BASES:
        for method in s["methods"]:
            if method in c[base]:
                e = c[base][method]["bf16"]
                print(f"  {base:<5} {c[base]['resolution']:>5} px {method:<12} {e['gflops']:>9.0f} GFLOPs  "
                      f"{e['saved_gib']:>6.2f} GiB saved  UNet {e['unet_params'] / 1e6:.0f} M, adapter "
                      f"{e['adapter_params'] / 1e6:.1f} M;  face-ID gate decode {c[base]['decode_gflops']:.0f} GFLOPs")
    print(f"Utilisation: {summary['utilisation']:.1%} of A100 bf16 peak (MosaicML's SD2-base UNet training, "
          f"{REFERENCE_IMAGES_PER_S:.1f} images/s per A100 at 512 px x "
          f"{c['reference_full_unet_sd21_512']['gflops']:.0f} GFLOPs counted per sample).\n")
    print(f"{'base/method':<20}{'optimizer':<10}{'gc':<5}" + "".join(f"{'GiB b' + str(b):>9}" for b in PROJECTED_BATCHES)
          + "".join(f"{'max b ' + str(g) + 'G':>10}" for g in CARDS_GIB) + f"{'A100 h':>9}{'H100 h':>9}  source")
    for key, projection in summary["projections"].items():
        t = summary["hours"][key]
        for r in projection["rows"]:
            print(f"{key:<20}{r['optimizer']:<10}{'on' if r['gradient_checkpointing'] else 'off':<5}"
                  + "".join(f"{r['gib_per_batch'][b]:>9.1f}" for b in PROJECTED_BATCHES)
                  + "".join(f"{r['largest_batch'][g]:>10}" for g in CARDS_GIB)
                  + f"{t['A100']:>9.1f}{t['H100 SXM']:>9.1f}  "
                  + ("parts measured (fp32 CPU, bf16 by counted ratio)" if r["measured"] else
                     "projected from counts and the measured base"))
    print(f"\nGiB include {CUDA_OVERHEAD_GIB:g} GiB assumed for CUDA context and workspaces, the face-ID decode of every "
          "sample (worst case: a face in every x̂0) for IDAdapter, and fp32 adapter weights, gradients and optimizer "
          f"state. Hours: {PAPER_STEPS} steps x batch {PAPER_BATCH} at the utilisation above (gradient "
          "checkpointing's recomputation not included). Load average (1 min) at the end: "
          f"{summary['load_average_1min']:.1f} on {os.cpu_count()} CPUs.")


# ---- main --------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the trainer's tiny models: a smoke run in about a minute")
    parser.add_argument("--base", choices=("sd15", "sd21"), default="sd15", help="base model built and run (default sd15)")
    parser.add_argument("--methods", nargs="+", choices=("idadapter", "inv-adapter"),
                        default=["idadapter", "inv-adapter"])
    parser.add_argument("--rehearse", nargs="*", choices=("idadapter", "inv-adapter"),
                        help="methods whose trainer commands run (default: --methods)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of each fit (default 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the rehearsal's fit (default 1)")
    parser.add_argument("--resolution", type=int, help="training resolution (default 512; 64 with --quick)")
    parser.add_argument("--fit-resolution", type=int,
                        help="resolution of the rehearsal's fit and eval (default: --resolution)")
    parser.add_argument("--parts-resolution", type=int,
                        help="resolution of the parts' batch 1 and 2 measurements (default 256; 32 with --quick)")
    parser.add_argument("--memory-cap-gib", type=float, default=16.0,
                        help="kill a command whose RSS passes this (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every process (default 2)")
    parser.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                        help="fit's mixed precision (default auto: bf16 where the CPU or GPU has bf16 arithmetic)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    parser.add_argument("--skip", nargs="*", default=[], choices=("rehearsal", "parts"),
                        help="leave out the trainer's commands or the parts' measurement")
    parser.add_argument("--assets", type=Path, default=SHARED_ASSETS,
                        help="real photos and the real detector (default ../shared/assets)")
    parser.add_argument("--workdir", type=Path, help="keep the model folders and runs here (default: a temp folder)")
    parser.add_argument("--parts", help=argparse.SUPPRESS)  # internal: measure one method's parts, JSON to this path
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if cuda_bf16 or bf16_instructions() else "no"


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(base=args.base, methods=tuple(args.methods), rehearse=tuple(args.rehearse or args.methods),
                    quick=args.quick, steps=args.steps,
                    batch_size=args.batch_size, resolution=args.resolution or (64 if args.quick else 512),
                    parts_resolution=args.parts_resolution or (32 if args.quick else 256),
                    fit_resolution=args.fit_resolution or args.resolution or (64 if args.quick else 512),
                    memory_cap_gib=args.memory_cap_gib, threads=args.threads,
                    mixed_precision=resolve_mixed_precision(args.mixed_precision),
                    device="cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def measure_parts_in_subprocess(args: argparse.Namespace, settings: Settings, folders: ModelFolders,
                                workdir: Path) -> dict:
    """Each method's parts in a process of its own, its RSS capped; partial results survive a kill."""
    parts = {}
    for method in settings.methods:
        out = workdir / f"parts-{method}.json"
        out.unlink(missing_ok=True)
        command = python("-m", "bench.real_scale", *forwarded_flags(args), "--methods", method,
                         "--workdir", str(workdir), "--parts", str(out))
        result = run_command(f"parts: {method}", command, settings.memory_cap_gib, workdir / f"parts-{method}.log",
                             env={"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(settings.threads)})
        parts[method] = json.loads(out.read_text()) if out.is_file() else {}
        if result.returncode != 0:
            parts[method]["error"] = f"exit {result.returncode} {result.stopped}: {result.tail[-300:]}"
    return parts


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--base", args.base, "--threads", str(args.threads), "--memory-cap-gib", str(args.memory_cap_gib),
             "--assets", str(args.assets)]
    for flag in ("quick", "cpu"):
        if getattr(args, flag):
            flags.append(f"--{flag}")
    flags += ["--mixed-precision", args.mixed_precision]
    for flag in ("resolution", "parts_resolution"):
        if getattr(args, flag):
            flags += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return flags


def reuse_or_run(skip: bool, path: Path, run: Callable[[], dict]) -> dict:
    """`run()`, kept as JSON at `path`; skipped, what an earlier run in the same --workdir kept there (or nothing)."""
    if skip:
        return json.loads(path.read_text()) if path.is_file() else {}
    result = run()
    path.write_text(json.dumps(result, indent=2, default=lambda o: asdict(o)))
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    args = parse_args(argv)
    settings = settings_from(args)
    torch.set_num_threads(settings.threads)
    if not (args.assets / DETECTOR).is_file():
        log.error("the real detector %s is missing; pass --assets (the folder holding insightface/ and faces/)",
                  args.assets / DETECTOR)
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        folders = write_models(workdir, BASES[settings.base], VIT_H_14_OPENCLIP, settings.quick, args.assets)
        if args.parts:
            result = measure_parts(settings, folders, settings.methods[0], Path(args.parts))
            Path(args.parts).write_text(json.dumps(result, indent=2))
            return 0
        rehearsal = reuse_or_run("rehearsal" in args.skip, workdir / "rehearsal.json",
                                 lambda: rehearse(settings, folders, workdir))
        parts = reuse_or_run("parts" in args.skip, workdir / "parts.json",
                             lambda: measure_parts_in_subprocess(args, settings, folders, workdir))
        log.info("counting FLOPs and saved activations on the meta device")
        summary = summarize(settings, rehearsal, parts, count_on_meta(settings))
    print_and_write(summary, print_table, args.json)
    failed = any(c["returncode"] != 0 and c["stopped"] != "on purpose" for c in summary["rehearsal"]["commands"])
    return 1 if failed or not all(summary["rehearsal"]["resume_exact"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
