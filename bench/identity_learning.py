"""Does the trainer learn identity? The paper's Table 2 ablation (DESIGN.md §2.8) in miniature, on CPU, and the same
check for Inv-Adapter and for IDAdapter's faster mode.

Data: the striped-disc identities of train/striped_faces.py (a disc's colours, stripe angle and offset, and a
made-up ArcFace embedding, are its identity; every caption is the same, so the references are the only carrier of
identity), written as a prepared cache, so `fit`'s own data code reads it.

Models (random weights, built in code, train/tiny_models.py `TINY_SPEC`): a tiny SD-like base model (UNet, VAE with
a near-deterministic posterior and a data-calibrated scaling factor, CLIP text encoder) whose UNet is first trained
on the training images with the plain caption (train/pretrain.py: a "base model" that denoises these faces in
general and knows no identity), and a tiny CLIP vision model. Then the adapter is trained with the trainer's own
step (`train.fit.TrainingSession`, driven without accelerate) in four settings (train/ablations.py), each from the
same initialisation and sample order:
- full: MFF -> E_r into the adapters, and E_c as the identity token;
- identity token only (the paper's "No MFF (no E_r)"): every adapter gate kept closed (tanh(0) = 0, frozen);
- adapter only (the paper's "No Text Embedding (no E_c)"): the trigger word keeps its own embedding;
- skip highest resolution: the faster mode (Apply IDAdapter's `blocks`), the adapters of the highest-resolution
  blocks closed at training and at inference; the full model is also evaluated with them closed at inference only.
Inv-Adapter (`--method inv-adapter`; train/inv_adapter_step.py, one reference image per sample, no identity dropout)
is trained from the same base model in four settings: forward-noised references (`reference_features: noised`) with
both EAA branches, with the self-attention branch only (W''_V frozen at 0) and the cross-attention branch only (the
gate frozen at 0), and DDIM-inverted references (the trainer's default) with both branches.

Check: diffusion loss on held-out target images of the TRAINING identities (images never used as targets or references
in training; with 8 identities the mapping from references to appearance is learned for those, not for identities
never seen), with fixed noise and a fixed grid of timesteps, conditioned on N references of the matching identity vs N
references of another training identity (shuffled; Inv-Adapter's reference is the first of them); gap = shuffled -
matching, which must be positive when identity is learned. Also shown: the loss without identity (E_r zeroed, plain
caption: the classifier-free-guidance input; for Inv-Adapter the EAA off, which is the base model), and the base
model alone. The faster mode's identity cost is the ratio of its gap to the full model's, per seed. Over several seeds
(each seed draws new identities, images, models and data order); mean and spread (sample standard deviation, and
min..max).

Run: `python -m bench.identity_learning [--method idadapter|inv-adapter|both] [--variants NAME ...] [--quick]
[--seeds 3] [--first-seed 0] [--steps 300] [--json PATH]` (on a 2-core machine shared with other jobs, 2026-12-06:
about 30 minutes a seed for IDAdapter's four settings at 300 steps, and as long for Inv-Adapter's four; `--quick`
halves the adapter training). Seeds are independent, so they can run as separate processes (`--first-seed k
--seeds 1`); `--json` is rewritten after every seed.
Prints a table and exits 0 (it is a report).
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.common import run_seeds, spread
from train.ablations import (
    adapter_only, cross_attention_only, highest_resolution_skipped, self_attention_only, skip_highest_resolution,
    token_only,
)
from train.cache import TrainCache
from train.config import resolve_config
from train.data import FrozenFeatures, ReferenceKey, Sample, load_target_image
from train.fit import TrainingSession
from train.pretrain import train_unet
from train.striped_faces import CAPTION, make_identities, make_images, write_synthetic_cache
from train.tiny_models import TINY_SPEC, ModelSpec, build_base_components, save_base_model, write_clip_vision

log = logging.getLogger("identity_learning")


@dataclass(frozen=True)
class Variant:
    """One trained setting: the method, trainer settings that differ from the method's default, and a change to the
    step module before its optimizer is made."""

    method: str
    adjust: Callable[[torch.nn.Module], None] | None = None
    config: tuple[tuple[str, object], ...] = ()


FULL_IDADAPTER, SKIPPED = "full (E_r + E_c)", "skip highest resolution (training and inference)"
SKIPPED_AT_INFERENCE = "full, skip highest resolution at inference only"
"""Not trained on its own: the full model evaluated with the faster mode."""
NOISED = (("reference_features", "noised"),)
VARIANTS: dict[str, Variant] = {
    FULL_IDADAPTER: Variant("idadapter"),
    "identity token only": Variant("idadapter", token_only),
    "adapter only": Variant("idadapter", adapter_only),
    SKIPPED: Variant("idadapter", skip_highest_resolution),
    "Inv-Adapter, DDIM-inverted references": Variant("inv-adapter"),
    "Inv-Adapter, forward-noised references": Variant("inv-adapter", config=NOISED),
    "Inv-Adapter, noised, self-attention only": Variant("inv-adapter", self_attention_only, config=NOISED),
    "Inv-Adapter, noised, cross-attention only": Variant("inv-adapter", cross_attention_only, config=NOISED),
}
METHODS = ("idadapter", "inv-adapter")


def method_variants(method: str) -> list[str]:
    return [name for name, variant in VARIANTS.items() if variant.method == method]


# ---- the check -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSet:
    """Held-out targets (rows of the evaluation cache) and, per target, N references of its own identity and N of
    another identity (rows of training images)."""

    targets: list[int]
    matching: list[tuple[ReferenceKey, ...]]
    shuffled: list[tuple[ReferenceKey, ...]]
    timesteps: list[int]


def make_eval_set(cache: TrainCache, held_out: list[int], num_refs: int, timesteps: list[int],
                  rng: np.random.Generator) -> EvalSet:
    """References are drawn from each identity's training images (the rows not in `held_out`); the shuffled ones come
    from the next identity in a random cyclic order of the identities (never the target's own)."""
    held = set(held_out)
    training_rows = {name: [r.row for r in records if r.row not in held]
                     for name, records in cache.identities().items()}
    order = list(rng.permutation(sorted(training_rows)))
    other = {name: order[(i + 1) % len(order)] for i, name in enumerate(order)}

    def draw(identity: str) -> tuple[ReferenceKey, ...]:
        return tuple(ReferenceKey(int(r)) for r in rng.choice(training_rows[identity], num_refs, replace=False))

    identities = [cache.records[row].identity for row in held_out]
    return EvalSet(held_out, [draw(name) for name in identities], [draw(other[name]) for name in identities], timesteps)


@torch.no_grad()
def held_out_loss(session: TrainingSession, features: FrozenFeatures, eval_set: EvalSet, condition: str) -> float:
    """Mean diffusion loss over the held-out targets and the timestep grid, with fixed noise (each (target,
    timestep) pair has its own seed, the same in every condition and every model). condition: 'matching',
    'shuffled' or 'no identity' (IDAdapter: E_r zeroed and the plain caption, as identity dropout trains it;
    Inv-Adapter, whose reference is its first reference: the EAA off, i.e. the base model)."""
    keep = condition != "no identity"
    inv_binding = session.step_module.frozen.binding if session.config.method == "inv-adapter" else None
    if inv_binding is not None:
        inv_binding.weight = 1.0 if keep else 0.0
    session.step_module.eval()
    losses = []
    for index, row in enumerate(eval_set.targets):
        references = eval_set.shuffled[index] if condition == "shuffled" else eval_set.matching[index]
        samples = [Sample(index=0, row=row, references=references, keep_identity=keep, flip=False,
                          seed=1_000_003 * index + k) for k in range(len(eval_set.timesteps))]
        batch = replace(session.batch(samples, features), timesteps=torch.tensor(eval_set.timesteps))
        losses.append(float(session.step_module(batch)["diffusion_loss"]))
        session.step_module.release()
    session.step_module.train()
    if inv_binding is not None:
        inv_binding.weight = 1.0
    return statistics.fmean(losses)


CONDITIONS = ("matching", "shuffled", "no identity")


def identity_probe(features: FrozenFeatures, held_out: list[int]) -> dict[str, float]:
    """How much identity each input carries: nearest-centroid accuracy on the held-out images, with centroids of the
    training images, of the CLIP image embedding (E_c is made from it alone), the mean CLIP patch token and the
    ArcFace embedding (both go into E_r). Chance is 1 / identities."""
    cache = features.cache
    inputs = features.references([(ReferenceKey(row),) for row in range(len(cache))])
    identity = np.array([record.identity for record in cache.records])
    training = np.ones(len(cache), bool)
    training[held_out] = False
    accuracy = {}
    for name, values in (("CLIP image embedding", inputs["clip_image_embeds"][:, 0]),
                         ("CLIP patch tokens (mean)", inputs["clip_patches"][:, 0].mean(dim=1)),
                         ("ArcFace embedding", inputs["face_embeds"][:, 0])):
        values = values.numpy()
        names = sorted(set(identity))
        centroids = np.stack([values[training & (identity == name)].mean(axis=0) for name in names])
        nearest = ((values[held_out][:, None] - centroids[None]) ** 2).sum(-1).argmin(axis=1)
        accuracy[name] = float(np.mean(np.array(names)[nearest] == identity[held_out]))
    return accuracy


@dataclass
class AdapterTraining:
    """How the identity benchmarks train their tiny adapters (this one and bench/identity_generation.py)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    """Adam's learning rate for the tiny adapter (the paper's 3e-5 is for the full-size one; our choice)."""
    lr_schedule: str = "constant"
    """The trainer's `lr_schedule`."""
    num_refs: int = 4
    mff_width: int = 32
    identity_dropout: float = 0.1
    """IDAdapter's (Inv-Adapter trains without: it has no "without identity" input)."""
    inversion_steps: int = 25
    """DDIM inversion steps of Inv-Adapter's inverted references."""

    def method_configs(self, train_cache: Path, base_folder: Path, clip_folder: Path | None, output_dir: Path,
                       resolution: int, seed: int) -> dict[str, dict]:
        """Per method, the trainer's settings (`resolve_config` overrides) every variant of it starts from; without a
        CLIP vision model (`clip_folder` None) IDAdapter's settings name none (the trainer then refuses them) and only
        Inv-Adapter can train."""
        common = dict(cache=str(train_cache), output_dir=str(output_dir), pretrained=str(base_folder),
                      num_refs=self.num_refs, batch_size=self.batch_size, lr=self.lr, lr_schedule=self.lr_schedule,
                      max_steps=self.steps, resolution=resolution, seed=seed, log_with="none", face_id_weight=0.0)
        return {
            "idadapter": dict(common, clip_vision="" if clip_folder is None else str(clip_folder),
                              mff_width=self.mff_width, mff_heads=4, identity_dropout=self.identity_dropout),
            "inv-adapter": dict(common, method="inv-adapter", identity_dropout=0.0,
                                inversion_steps=self.inversion_steps),
        }


@dataclass
class Settings(AdapterTraining):
    identities: int = 8
    train_images: int = 24
    """Per identity: training images (targets and references)."""
    held_out_images: int = 2
    """Per identity: held-out target images."""
    base_steps: int = 300
    base_batch_size: int = 16
    base_lr: float = 2e-3
    face_dim: int = 32
    timesteps: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 800, 900)


@dataclass
class SeedResult:
    seed: int
    base_model_loss: float
    """Held-out loss of the base model alone: the untrained adapter without identity (gates and K/V deltas are 0, the
    plain caption), which is the base model with the caption it was trained with."""
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    """variant -> condition -> held-out loss."""
    probe: dict[str, float] = field(default_factory=dict)
    """`identity_probe` of the seed's data and CLIP model."""
    seconds: float = 0.0

    def gap(self, variant: str) -> float:
        return self.losses[variant]["shuffled"] - self.losses[variant]["matching"]


def run_seed(seed: int, settings: Settings, spec: ModelSpec, workdir: Path,
             variants: list[str] | None = None) -> SeedResult:
    """New identities, images, base model and CLIP model from `seed`; each variant (default: all of `VARIANTS`)
    trained from the same start (per method, the same adapter initialisation; the same sample order)."""
    started = time.perf_counter()
    variants = list(VARIANTS) if variants is None else variants
    rng = np.random.default_rng(seed)
    identities = make_identities(settings.identities, settings.face_dim, rng)
    per_identity = settings.train_images + settings.held_out_images
    images = make_images(identities, per_identity, workdir / "images", spec.resolution, rng)
    training = [image for name in images for image in images[name][:settings.train_images]]
    held_out = [image for name in images for image in images[name][settings.train_images:]]
    train_cache = write_synthetic_cache(workdir / "train-cache", training, settings.face_dim)
    eval_cache = TrainCache(write_synthetic_cache(workdir / "eval-cache", training + held_out, settings.face_dim))
    eval_set = make_eval_set(eval_cache, list(range(len(training), len(eval_cache))), settings.num_refs,
                             list(settings.timesteps), rng)

    log.info("seed %d: training the base UNet on %d images without identity", seed, len(training))
    parts = build_base_components(spec, seed)
    pixels = torch.stack([load_target_image(image.path, spec.resolution)[0] for image in training])
    train_unet(parts, pixels, [CAPTION] * len(training), settings.base_steps, settings.base_batch_size,
               settings.base_lr, seed, cosine_decay=False)
    base_folder = save_base_model(parts, workdir / "base")
    clip_folder = write_clip_vision(workdir / "clip", spec.clip_vision, seed)
    method_settings = settings.method_configs(train_cache, base_folder, clip_folder, workdir / "out", spec.resolution,
                                              seed)
    result = SeedResult(seed, base_model_loss=math.nan)
    for name in variants:
        variant = VARIANTS[name]
        session = TrainingSession(resolve_config(None, {**method_settings[variant.method], **dict(variant.config)}),
                                  adjust=variant.adjust)
        eval_features = session.frozen_features(eval_cache)
        if math.isnan(result.base_model_loss):
            result.base_model_loss = held_out_loss(session, eval_features, eval_set, "no identity")
        if not result.probe and session.clip is not None:
            result.probe = identity_probe(eval_features, eval_set.targets)
        session.run(settings.steps, f"seed {seed}: {name}")
        result.losses[name] = {c: held_out_loss(session, eval_features, eval_set, c) for c in CONDITIONS}
        if name == FULL_IDADAPTER and SKIPPED in variants:
            with highest_resolution_skipped(session.step_module):
                result.losses[SKIPPED_AT_INFERENCE] = {
                    c: held_out_loss(session, eval_features, eval_set, c) for c in CONDITIONS}
        log.info("seed %d, %s: %s; gap %.4f", seed, name,
                 ", ".join(f"{c} {v:.4f}" for c, v in result.losses[name].items()), result.gap(name))
    result.seconds = time.perf_counter() - started
    return result


# ---- report ------------------------------------------------------------------------------------------------------

def summarize(settings: Settings, results: list[SeedResult]) -> dict:
    variants = {}
    for variant in results[0].losses:
        gaps = [r.gap(variant) for r in results]
        variants[variant] = dict(
            **{condition: spread([r.losses[variant][condition] for r in results]) for condition in CONDITIONS},
            gap=spread(gaps), relative_gap=spread([r.gap(variant) / r.losses[variant]["matching"] for r in results]),
            positive_gaps=sum(g > 0 for g in gaps),
        )
    skip_ratios = {name: spread([r.gap(name) / r.gap(FULL_IDADAPTER) for r in results])
                   for name in (SKIPPED, SKIPPED_AT_INFERENCE) if name in variants and FULL_IDADAPTER in variants}
    checked = [names[0] for method in METHODS if (names := [v for v in method_variants(method) if v in variants])]
    return dict(
        settings=asdict(settings), torch=torch.__version__, seeds=[asdict(r) for r in results], variants=variants,
        base_model_loss=spread([r.base_model_loss for r in results]), skip_gap_ratio=skip_ratios,
        probe={name: statistics.fmean(r.probe[name] for r in results) for name in results[0].probe},
        checked=checked,
        check="PASS" if all(variants[name]["positive_gaps"] == len(results) for name in checked) else "FAIL",
    )


def print_table(summary: dict) -> None:
    s = summary["settings"]
    seeds = summary["seeds"]
    print(f"\nIdentity learning, the paper's Table 2 ablation in miniature (IDAdapter), Inv-Adapter's branches and "
          f"reference features, the faster mode: {s['identities']} synthetic identities x {s['train_images']} training "
          f"images; tiny models ({TINY_SPEC.resolution} px); base UNet trained {s['base_steps']} steps without "
          f"identity, then the adapter {s['steps']} steps (batch {s['batch_size']}, Adam lr {s['lr']:g}; IDAdapter: "
          f"N = {s['num_refs']}, identity dropout {s['identity_dropout']:g}, no face-ID loss; Inv-Adapter: one "
          f"reference image, {s['inversion_steps']} DDIM inversion steps). Held out: {s['held_out_images']} images of "
          "each TRAINING identity, never a target or a reference in training. Loss: ε-MSE at t = "
          f"{', '.join(map(str, s['timesteps']))}, fixed noise per (image, t). "
          f"Seeds {', '.join(str(r['seed']) for r in seeds)}: mean ± sample std [min .. max].\n")
    cell = lambda v, digits=4: f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    header = ("variant", "matching refs", "shuffled refs", "no identity", "gap shuffled - matching", "gap > 0")
    rows = [(name, cell(v["matching"]), cell(v["shuffled"]), cell(v["no identity"]),
             f"{cell(v['gap'])} [{v['gap']['min']:.4f} .. {v['gap']['max']:.4f}]",
             f"{v['positive_gaps']}/{len(seeds)}") for name, v in summary["variants"].items()]
    rows.append(("base model alone", cell(summary["base_model_loss"]), "", "", "", ""))
    widths = [max(len(row[i]) for row in [header, *rows]) + 2 for i in range(len(header))]
    for row in [header, *rows]:
        print("".join(f"{text:<{width}}" for text, width in zip(row, widths)))
    print("\nper seed, gap (shuffled - matching) per variant: " + "; ".join(
        f"seed {r['seed']}: " + ", ".join(f"{name} {r['losses'][name]['shuffled'] - r['losses'][name]['matching']:+.4f}"
                                          for name in r["losses"]) + f" ({r['seconds']:.0f} s)" for r in seeds))
    print("No identity: IDAdapter's E_r zeroed with the plain caption; Inv-Adapter's EAA off (the base model).")
    for name in summary["checked"]:
        relative = summary["variants"][name]["relative_gap"]
        print(f"{name}: the gap is {relative['mean']:.1%} ± {relative['std']:.1%} of the matching loss.")
    for name, ratio in summary["skip_gap_ratio"].items():
        print(f"Faster mode, gap ratio {name} ÷ full: {cell(ratio, 2)} [{ratio['min']:.2f} .. {ratio['max']:.2f}]")
    print(f"Check (gap > 0 in every seed for {', '.join(summary['checked'])}): {summary['check']}.")
    if FULL_IDADAPTER in summary["variants"]:
        print("The paper's Table 2 (ID-Sim, full size): full 0.603, no E_r 0.517, no E_c 0.394.")
    if summary["probe"]:
        print("Identity in the inputs, nearest-centroid accuracy on the held-out images "
              f"(chance {1 / s['identities']:.2f}): "
              + ", ".join(f"{name} {value:.2f}" for name, value in summary["probe"].items())
              + ". E_c is made from the CLIP image embedding alone; E_r also sees the ArcFace embedding.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the training steps")
    parser.add_argument("--method", choices=(*METHODS, "both"), default="idadapter",
                        help="whose variants to train (default idadapter: its ablations and the faster mode)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                        help="train these variants instead of --method's (quoted names: " + "; ".join(VARIANTS) + ")")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are FIRST_SEED, FIRST_SEED + 1, ... (default 0)")
    parser.add_argument("--steps", type=int, help=f"adapter training steps (default {Settings.steps})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models run fastest so)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("train.models", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings()
    settings.steps = args.steps or (settings.steps // 2 if args.quick else settings.steps)
    variants = args.variants or [name for method in (METHODS if args.method == "both" else (args.method,))
                                 for name in method_variants(method)]

    def run(seed: int) -> SeedResult:
        with tempfile.TemporaryDirectory() as folder:
            return run_seed(seed, settings, TINY_SPEC, Path(folder), variants)

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print_table(run_seeds(seeds, run, partial(summarize, settings), args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
