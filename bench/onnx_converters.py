"""Our ONNX->torch converter (train/onnx_to_torch.py) against onnx2torch, on insightface-style recognizers.

Recognizers: the real stand-in MobileFaceNet (../shared/assets, 128-d) on aligned crops of the real photos (the
pack's own detector and alignment), and random-weight MobileFaceNet, IResNet-50 and IResNet-100 exported like
insightface's files (train/insightface_archs.py) on random crops. Plus the coverage graphs of
train/onnx_reference_graphs.py (single ops, an mxnet-style opset-8 recognizer), which tests/test_arcface_torch.py runs.

For each recognizer and each converter:
  * deviation of the embedding from onnxruntime as insightface runs it (`ArcFaceONNX.get_feat`, one crop at a
    time): max abs, and relative = max abs / max |reference|; the minimum cosine;
  * gradients of the face-ID loss form (1 - cos) to the input pixels: finite, non-zero share, and their agreement
    between the converters (max |g_o2t - g_ours| / max |g_ours|);
  * what the trainer does with the module: `requires_grad_(False)` (no trainable parameter left), `.eval()` and
    `.train()` give the same output, `.to(bf16 / fp16)` runs (deviation from float32), a batch of 3 through a
    static-batch-1 graph (called directly, and per sample under `torch.func.vmap` as ArcFaceTorch does);
  * conversion time (from the loaded ModelProto) and forward+backward time, the two converters interleaved round
    by round in this process with one thread: ratio onnx2torch / ours per round (median, min-max) and of the
    fastest runs.
Both converters run behind the same wrapper (insightface's normalisation, vmap over the batch), so the ratio is
the graph modules' own.

onnx2torch needs torchvision at import; PyPI's torchvision does not import beside the CPU torch 2.13.0 wheel CI
uses, so this runs in any venv where `import onnx2torch` works (e.g. torch 2.14.1 + torchvision 0.29.1) and
reports ours alone where it does not.

Run: `python -m bench.onnx_converters [--quick] [--json PATH]` (--quick: no IResNet-100, fewer rounds), in e.g.
`python3 -m venv V && V/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx2torch==1.5.15 onnx onnxruntime
insightface opencv-python-headless einops safetensors pillow pytest` (5.6 GB: 2.14.1 is a CUDA build).

Measured 2026-12-06 (torch 2.14.1 on 2 shared CPU cores, onnx2torch 1.5.15): embeddings equal to each other and
within 2.4e-6 relative of onnxruntime on all four recognizers, input gradients bitwise equal; fwd+bwd
onnx2torch / ours 0.95-1.08 (median per round) once ours used torch's fused PReLU and hardtanh for constant Clip,
0.56-0.92 before; conversion 0.05-3.4 s vs 0.01-0.7 s. onnx2torch refuses SAME_* conv padding, asymmetric
AveragePool padding and opset-7/8 BatchNormalization (mxnet-converted recognizers) and gives wrong outputs for
Pad-10's `value` and a Dropout with its mask output.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from bench.common import SHARED_ASSETS, Variant, interleaved_times, print_and_write, ratios, timed
from train.arcface_torch import insightface_input_normalisation
from train.insightface_archs import (
    IRESNET50_STAGES, IRESNET100_STAGES, IResNet, MobileFaceNet, as_input, export_like_insightface, get_feat_rgb,
    random_crops, randomize, real_crops,
)
from train.onnx_reference_graphs import SINGLE_OP_GRAPHS, mxnet_style_recognizer, rand
from train.onnx_to_torch import convert_onnx


try:
    import onnx2torch
    ONNX2TORCH_ERROR = None
except Exception as err:  # torchvision missing or not loadable beside this torch
    onnx2torch = None
    ONNX2TORCH_ERROR = f"{type(err).__name__}: {err}"

STANDIN = "standin_scrfd_mbf128"


# ------------------------------------------------------------------------------------------------- the wrappers

class Embedder(torch.nn.Module):
    """ArcFaceTorch's forward around any graph module: insightface's normalisation, then the static-batch-1 graph
    once per sample under vmap (or on the whole batch with `vmap=False`)."""

    def __init__(self, graph: torch.nn.Module, mean: float, std: float, vmap: bool = True) -> None:
        super().__init__()
        self.graph, self.mean, self.std, self.vmap = graph, mean, std, vmap

    def dtype(self) -> torch.dtype:
        return next((t.dtype for t in (*self.graph.parameters(), *self.graph.buffers()) if t.is_floating_point()),
                    torch.float32)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        blob = (rgb.to(self.dtype()) * 255.0 - self.mean) * (1.0 / self.std)
        if not self.vmap:
            return self.graph(blob).reshape(blob.shape[0], -1)
        return torch.func.vmap(lambda x: self.graph(x.unsqueeze(0)).reshape(-1))(blob)


def ours(model: onnx.ModelProto) -> torch.nn.Module:
    return convert_onnx(model)


def theirs(model: onnx.ModelProto) -> torch.nn.Module:
    return onnx2torch.convert(copy.deepcopy(model))  # it may edit the proto it is given


CONVERTERS: dict[str, Callable[[onnx.ModelProto], torch.nn.Module]] = {"ours": ours}
if onnx2torch is not None:
    CONVERTERS["onnx2torch"] = theirs


# -------------------------------------------------------------------------------------------------- the inputs

def onnxruntime_embeddings(path: Path, crops: np.ndarray) -> np.ndarray:
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    return get_feat_rgb(ArcFaceONNX(model_file=str(path)), crops)


# ------------------------------------------------------------------------------------------------ measurements

def deviation(embedding: torch.Tensor, reference: np.ndarray) -> dict:
    e = embedding.detach().double().numpy()
    r = reference.astype(np.float64)
    if e.shape != r.shape:
        return {"error": f"shape {e.shape} != {r.shape}"}
    abs_dev = float(np.abs(e - r).max())
    cos = np.sum(e * r, 1) / np.linalg.norm(e, axis=1) / np.linalg.norm(r, axis=1)
    return {"max_abs": abs_dev, "max_rel": abs_dev / float(np.abs(r).max()), "min_cos": float(cos.min())}


def input_gradient(embed: torch.nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = image.clone().requires_grad_(True)
    (1 - torch.nn.functional.cosine_similarity(embed(x).float(), target)).sum().backward()
    return x.grad


def attempt(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as err:  # a check that fails is a result here, not a crash
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}


def trainer_checks(graph: torch.nn.Module, mean: float, std: float, image: torch.Tensor) -> dict:
    """What FaceIDLoss / the trainer do with the recognizer, on a copy of the converted graph."""
    graph = copy.deepcopy(graph)
    graph.requires_grad_(False)
    out: dict = {"trainable_params": sum(p.numel() for p in graph.parameters() if p.requires_grad),
                 "state_dict_tensors": len(graph.state_dict())}
    embed = Embedder(graph, mean, std)
    with torch.no_grad():
        graph.eval()
        reference = embed(image)
        graph.train()
        out["train_mode_max_rel"] = attempt(
            lambda: float((embed(image) - reference).abs().max() / reference.abs().max()))
        graph.eval()

        def direct_batch():
            y = Embedder(graph, mean, std, vmap=False)(image)
            return float((y - reference).abs().max() / reference.abs().max())

        out["batch3_direct_max_rel"] = attempt(direct_batch)
        out["batch3_vmap_shape"] = list(reference.shape)
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            def low_precision(dtype=dtype):
                y = Embedder(copy.deepcopy(graph).to(dtype), mean, std)(image).float()
                return float((y - reference).abs().max() / reference.abs().max())

            out[f"{name}_max_rel"] = attempt(low_precision)
    return out


def bench_recognizer(label: str, path: Path, crops: np.ndarray, rounds: int, batch: int) -> dict:
    model = onnx.load(str(path))
    mean, std = insightface_input_normalisation(model)
    result: dict = {"ops": sorted({n.op_type for n in model.graph.node}),
                    "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}
    reference = onnxruntime_embeddings(path, crops)
    image = as_input(crops)
    target = torch.randn(len(crops), reference.shape[1], generator=torch.Generator().manual_seed(0))
    graphs, embedders, grads = {}, {}, {}
    for name, convert in CONVERTERS.items():
        entry: dict = {}
        try:
            times = [timed(lambda: convert(model)) for _ in range(2)]
            graphs[name] = convert(model)
        except Exception as err:
            result[name] = {"error": f"conversion: {type(err).__name__}: {err}"}
            continue
        entry["convert_s"] = min(times)
        graphs[name].eval().requires_grad_(False)
        embedders[name] = Embedder(graphs[name], mean, std)
        with torch.no_grad():
            entry["vs_onnxruntime"] = attempt(lambda: deviation(embedders[name](image), reference))
        grad = attempt(lambda: input_gradient(embedders[name], image, target))
        if isinstance(grad, torch.Tensor):
            grads[name] = grad
            entry["grad_finite"] = bool(torch.isfinite(grad).all())
            entry["grad_nonzero_share"] = float((grad != 0).double().mean())
        else:
            entry["grad"] = grad
        entry["trainer"] = trainer_checks(graphs[name], mean, std, image[:3])
        result[name] = entry
    if {"ours", "onnx2torch"} <= grads.keys():
        g_ours, g_theirs = grads["ours"], grads["onnx2torch"]
        result["grad_agreement_max_rel"] = float((g_theirs - g_ours).abs().max() / g_ours.abs().max())
    if {"ours", "onnx2torch"} <= embedders.keys():
        result["fwd_bwd"] = speed(embedders, image[:batch], target[:batch], rounds)
    print(f"  {label}: done", flush=True)
    return result


def speed(embedders: dict, image: torch.Tensor, target: torch.Tensor, rounds: int) -> dict:
    """Forward+backward per batch, one thread, the two interleaved (order alternating) after a warm-up each: the
    per-round ratio (median, min-max), and the ratio of each one's fastest run (other processes only add time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = interleaved_times([Variant(name, lambda embed=embed: input_gradient(embed, image, target))
                                   for name, embed in embedders.items()], rounds, warmup=1)
    finally:
        torch.set_num_threads(threads)
    per_round = ratios(times["onnx2torch"], times["ours"])
    fastest = {name: min(values) for name, values in times.items()}
    return {"batch": len(image), "rounds": rounds, "ours_min_s": fastest["ours"],
            "onnx2torch_min_s": fastest["onnx2torch"], "ratio_of_fastest": fastest["onnx2torch"] / fastest["ours"],
            "ratio_median": statistics.median(per_round), "ratio_min": min(per_round), "ratio_max": max(per_round)}


# ---------------------------------------------------------------------------------------------- coverage graphs

def coverage() -> dict:
    """The single-op graphs and the mxnet-style recognizer of train/onnx_reference_graphs.py, vs onnxruntime."""
    import onnxruntime

    cases = {**{k: v for k, v in SINGLE_OP_GRAPHS.items()}, "mxnet-style recognizer (opset 8)": mxnet_style_recognizer}
    out = {}
    for case, build in cases.items():
        model = build()
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        if "mxnet" in case:  # raw 0..255 pixels
            x = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
        else:
            x = 3 * rand(*shape, seed=9)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        reference = session.run(None, {session.get_inputs()[0].name: x})[0]
        row = {}
        for name, convert in CONVERTERS.items():
            def run():
                with torch.no_grad():
                    y = convert(model).eval()(torch.from_numpy(x)).numpy()
                if y.shape != reference.shape:
                    return f"shape {y.shape} != {reference.shape}"
                return float(np.abs(y - reference).max() / max(1.0, float(np.abs(reference).max())))

            value = attempt(run)
            row[name] = value["error"] if isinstance(value, dict) else value
        out[case] = row
    return out


# ------------------------------------------------------------------------------------------------------- report

def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def fmt(value) -> str:
    if isinstance(value, dict) and "error" in value:
        return "FAILS: " + value["error"]
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value)


def print_table(results: dict) -> None:
    print(f"\ntorch {torch.__version__}; onnx2torch {package_version('onnx2torch') or '-'}; torchvision "
          f"{package_version('torchvision') or '-'}" + (f" ({ONNX2TORCH_ERROR})" if ONNX2TORCH_ERROR else ""))
    for label, r in results["recognizers"].items():
        print(f"\n== {label}  (opset {r['opset']}; ops: {', '.join(r['ops'])})")
        for name in CONVERTERS:
            e = r.get(name, {})
            if "error" in e:
                print(f"  {name:10s} {e['error']}")
                continue
            dev = e["vs_onnxruntime"]
            dev_text = fmt(dev) if "error" in dev else (
                f"max abs {dev['max_abs']:.2e}  max rel {dev['max_rel']:.2e}  min cos 1-{1 - dev['min_cos']:.1e}")
            print(f"  {name:10s} vs onnxruntime: {dev_text};  convert {e['convert_s']:.2f} s;  grad finite "
                  f"{e.get('grad_finite')} non-zero {e.get('grad_nonzero_share', float('nan')):.3f}")
            t = e["trainer"]
            print(f"  {'':10s} trainable after requires_grad_(False): {t['trainable_params']};  state_dict tensors "
                  f"{t['state_dict_tensors']};  train() vs eval(): {fmt(t['train_mode_max_rel'])};  batch 3 "
                  f"direct: {fmt(t['batch3_direct_max_rel'])};  bf16: {fmt(t['bf16_max_rel'])};  fp16: "
                  f"{fmt(t['fp16_max_rel'])}")
        if "grad_agreement_max_rel" in r:
            print(f"  d(1-cos)/d(input), onnx2torch vs ours: max rel {r['grad_agreement_max_rel']:.2e}")
        if "fwd_bwd" in r:
            s = r["fwd_bwd"]
            print(f"  fwd+bwd batch {s['batch']}, 1 thread, {s['rounds']} interleaved rounds: onnx2torch / ours = "
                  f"{s['ratio_median']:.3f} per round (min {s['ratio_min']:.3f}, max {s['ratio_max']:.3f}); fastest "
                  f"runs {s['onnx2torch_min_s']:.3f} s / {s['ours_min_s']:.3f} s = {s['ratio_of_fastest']:.3f}")
    print("\n== coverage graphs of tests/test_arcface_torch.py: max deviation / max(1, |ref|) vs onnxruntime")
    for case, row in results["coverage"].items():
        print(f"  {case:72s} " + "  ".join(f"{n}: {fmt(v)}" for n, v in row.items()))


@dataclass
class Settings:
    rounds: int
    """Interleaved forward+backward rounds per recognizer."""
    iresnet100: bool
    """Also the random IResNet-100 (glintr100's layout; the largest file)."""


def measure(settings: Settings) -> dict:
    results: dict = {"torch": torch.__version__, "onnx2torch": package_version("onnx2torch"),
                     "torchvision": package_version("torchvision"), "onnx2torch_error": ONNX2TORCH_ERROR,
                     "recognizers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        recognizers: list[tuple[str, Path, np.ndarray, int]] = []
        standin = SHARED_ASSETS / "insightface" / "models" / STANDIN / "w_mbf128.onnx"
        if standin.is_file():
            recognizers.append(("real stand-in w_mbf128 (MobileFaceNet, 128-d), 4 real photos", standin,
                                real_crops(SHARED_ASSETS, STANDIN), 4))
        else:
            print(f"no real stand-in recognizer at {standin}: skipped")
        archs = {"random MobileFaceNet (512-d)": lambda: MobileFaceNet(),
                 "random IResNet-50 (w600k_r50 layout)": lambda: IResNet(IRESNET50_STAGES)}
        if settings.iresnet100:
            archs["random IResNet-100 (glintr100 layout)"] = lambda: IResNet(IRESNET100_STAGES)
        for i, (label, build) in enumerate(archs.items()):
            path = export_like_insightface(randomize(build(), seed=i), Path(tmp) / f"rec{i}.onnx")
            recognizers.append((label, path, random_crops(3, seed=i), 2))
        for label, path, crops, batch in recognizers:
            results["recognizers"][label] = bench_recognizer(label, path, crops, settings.rounds, batch)
    results["coverage"] = coverage()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="no IResNet-100, 3 rounds (else 9)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if ONNX2TORCH_ERROR:
        print(f"onnx2torch unavailable here ({ONNX2TORCH_ERROR}); measuring ours alone")
    results = measure(Settings(rounds=args.rounds or (3 if args.quick else 9), iresnet100=not args.quick))
    print_and_write(results, print_table, args.json)


if __name__ == "__main__":
    main()
