"""Training throughput with the frozen features cached ÷ the same loop recomputing them every step.

The frozen features are the CLIP vision features of each sample's N reference crops and the VAE latent of its target
image (train/data.py `FrozenFeatures`; `fit --cache-features`, on by default). With caching they are computed once
per image; without, every step loads and resizes the target image, VAE-encodes it and runs CLIP on the N crops.
The ArcFace embeddings of the references come from the prepared cache in both variants (`prepare` computed them).

What the ratio is depends on how expensive CLIP vision + VAE encoding are next to the trained step (text encoder,
MFF, UNet with the adapters, forward and backward, and with the face-ID loss the VAE decode of x̂0: forward for the
detector gate, then forward and backward for the samples whose x̂0 shows a face, `FaceIDLoss.from_latents`), so
the models here keep the real proportions: SD1.5 (UNet, VAE, CLIP-L text encoder) and OpenCLIP ViT-H/14 at 512 px
with the sd15 adapter sizes (DESIGN.md §2.2, §2.3, §2.4), every width scaled by w and the resolution by r = sqrt(w), and
every token count with it (text tokens x r^2, CLIP patches x r^2, so E_r has 4*256*r^2 + 1 tokens). Then every linear
layer and convolution (FLOPs ~ width^2 x tokens) and every attention (~ tokens^2 x width) shrinks by the same w^3,
and the FLOP shares of the parts stay those of the real models. Heads keep their real width (their number scales),
so attention runs at the real head widths. Default w = 1/4 (r = 1/2: 256 px, 80-channel UNet): 1/64 of the real
FLOPs.

Reported:
- FLOPs per sample of each part (torch.utils.flop_counter, 2 x MACs, elementwise ops not counted), for the real
  layouts (counted on the meta device) and for the scaled ones, and the FLOP-based expectation of the ratio;
- the FLOPs of the trainer's own step as run here, counted around it (a check of the part-by-part count);
- measured samples/s of the trainer's step (`train.fit.TrainingSession.step`: the plan's samples, the batch,
  `IDAdapterTrainingStep`, backward, Adam) with caching on and off, interleaved rounds (the order rotated), after
  warm-up rounds and with the cache filled; median of the per-round ratios. With the face-ID loss (λ = 0.1, the
  paper's recipe) when an insightface pack is found (the gate's detector runs on every decoded image; the models'
  random weights draw no faces, so neither the decode with gradients nor the recognizer runs: the FLOP expectation
  is also given for a gate open on every sample, the most the face-ID loss can cost), and without.

Goal: ratio >= 1.3, judged with and without the face-ID loss. Prints a table and exits 0 (it is a report).
Run: `python -m bench.train_throughput [--quick] [--width 0.25] [--rounds 5] [--json PATH]` (about 4 minutes on 2
shared cores).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import (
    CLIP_L_TEXT, FACE_ID_WEIGHT, NUM_REFS, SD15_UNET, SD_VAE, VIT_H_14, Variant, count_flops, interleaved_times,
    print_and_write,
)
from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig
from idadapter_core.hosts import DiffusersIDAdapter, layout_from_diffusers_unet
from train.config import FitConfig, resolve_config
from train.data import FrozenFeatures, ReferenceKey, Sample
from train.fit import TrainingSession
from train.real_size_models import TEXT_TOKENS
from train.striped_faces import make_identities, make_images, write_synthetic_cache
from train.tiny_models import ModelSpec, build_base_components, save_base_model, write_clip_vision

log = logging.getLogger("train_throughput")

GOAL = 1.3
ARCFACE_DIM = 512
DEFAULT_FACE_PACK = (Path(__file__).resolve().parents[2] / "shared" / "assets" / "insightface", "standin_scrfd_mbf128")

SD15 = ModelSpec(unet=SD15_UNET, vae=SD_VAE, text=CLIP_L_TEXT, clip_vision=VIT_H_14, resolution=512,
                 text_tokens=TEXT_TOKENS)
"""The real layouts at 512 px: SD1.5's UNet, VAE and CLIP-L text encoder, OpenCLIP ViT-H/14."""


@dataclass(frozen=True)
class Scale:
    """Widths x `width`, resolution x `resolution`; the FLOP shares are the real ones when resolution² = width."""

    width: float
    resolution: float


@dataclass(frozen=True)
class ScaledModels:
    spec: ModelSpec
    mff_width: int
    mff_heads: int


def scaled_spec(scale: Scale) -> ScaledModels:
    """SD1.5 + ViT-H/14 and the sd15 MFF (the trainer's default width and heads) scaled (`ModelSpec.scaled`)."""
    return ScaledModels(SD15.scaled(scale.width, scale.resolution), round(FitConfig.mff_width * scale.width),
                        max(1, round(FitConfig.mff_heads * scale.width)))


REAL = Scale(1.0, 1.0)


# ---- FLOPs, part by part, on the meta device -----------------------------------------------------------------------

@dataclass
class PartFlops:
    """FLOPs per training sample."""

    step: int
    """MFF + identity MLP, text encoder with E_c spliced, UNet with the adapters; forward and backward."""
    face_id_gate: int
    """The face-ID loss's VAE decode of x̂0 for the detector gate (forward, no grad; every sample)."""
    face_id_decode: int
    """The decode again with gradients, forward and backward (to the latents): the samples whose x̂0 shows a face."""
    clip_references: int
    """CLIP vision of the N reference crops (forward, no grad)."""
    vae_encode: int
    """VAE encoding of the target image (forward, no grad)."""

    def expected_ratio(self, face_id: bool, gate_rate: float = 0.0) -> float:
        """Cached ÷ recomputed from FLOPs, with the gate open on `gate_rate` of the samples."""
        trained = self.step + ((self.face_id_gate + gate_rate * self.face_id_decode) if face_id else 0)
        return (trained + self.clip_references + self.vae_encode) / trained


def part_flops(models: ScaledModels, face_dim: int = ARCFACE_DIM) -> PartFlops:
    """The parts of one training sample (batch 1), counted on the meta device: nothing is allocated or computed.
    The same computation as `IDAdapterTrainingStep` (train/fit.py), written out so that it runs on meta tensors."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    spec = models.spec
    meta = torch.device("meta")
    text_width, latent = spec.text["hidden_size"], spec.resolution // 8
    parts = build_base_components(spec, seed=0, device=meta)
    unet, vae, text = parts.unet, parts.vae.requires_grad_(False), parts.text_encoder
    clip_config = CLIPVisionConfig(**spec.clip_vision)
    patches = (clip_config.image_size // clip_config.patch_size) ** 2
    with meta:
        clip = CLIPVisionModelWithProjection(clip_config)
        adapter = IDAdapter(IDAdapterConfig(
            layout=layout_from_diffusers_unet(unet, text_widths={"l": text_width}), num_refs=NUM_REFS,
            mff=MFFConfig(clip_dim=clip_config.hidden_size, face_dim=face_dim, num_patches=patches,
                          width=models.mff_width, heads=models.mff_heads), clip_embed_dim=clip_config.projection_dim,
        ))
    for frozen in (unet, vae, text, clip):
        frozen.requires_grad_(False)
    binding = DiffusersIDAdapter(unet, adapter)
    trigger = torch.zeros(1, spec.text_tokens, 1, dtype=torch.bool, device=meta)

    def prediction() -> torch.Tensor:
        embeds = adapter.encode(torch.randn(1, NUM_REFS, patches, clip_config.hidden_size, device=meta),
                                torch.randn(1, NUM_REFS, face_dim, device=meta),
                                torch.randn(1, NUM_REFS, clip_config.projection_dim, device=meta))
        binding.set_identity(embeds.reference_tokens)
        splice = text.get_input_embeddings().register_forward_hook(
            lambda module, args, out: torch.where(trigger, embeds.identity_tokens["l"][:, None], out))
        try:
            context = text(torch.zeros(1, spec.text_tokens, dtype=torch.long, device=meta)).last_hidden_state
        finally:
            splice.remove()
        noisy = torch.randn(1, 4, latent, latent, device=meta)
        return unet(noisy, torch.tensor([500], device=meta), encoder_hidden_states=context).sample

    def step() -> None:
        F.mse_loss(prediction(), torch.randn(1, 4, latent, latent, device=meta)).backward()

    def decode() -> None:
        z0 = torch.randn(1, 4, latent, latent, device=meta, requires_grad=True)
        vae.decode(z0).sample.mean().backward()

    flops = PartFlops(step=count_flops(step), face_id_gate=0, face_id_decode=count_flops(decode), clip_references=0,
                      vae_encode=0)
    with torch.no_grad():
        flops.face_id_gate = count_flops(lambda: vae.decode(torch.randn(1, 4, latent, latent, device=meta)))
        image = torch.randn(1, 3, clip_config.image_size, clip_config.image_size, device=meta)
        flops.clip_references = NUM_REFS * count_flops(lambda: clip(pixel_values=image, output_hidden_states=True))
        target = torch.randn(1, 3, spec.resolution, spec.resolution, device=meta)
        flops.vae_encode = count_flops(lambda: vae.encode(target))
    return flops


# ---- the measured loop ---------------------------------------------------------------------------------------------

@dataclass
class Settings:
    scale: Scale
    rounds: int
    warmup: int
    batch_size: int
    steps_per_run: int
    face_pack: tuple[Path, str] | None


@dataclass
class Setup:
    session: TrainingSession
    cached: FrozenFeatures
    recomputed: FrozenFeatures
    face_id: bool
    """Whether the face-ID loss's models were loaded (λ > 0 can be measured)."""


def build_setup(settings: Settings, workdir: Path, seed: int = 0) -> Setup:
    """Scaled models written as local folders, a synthetic prepared cache (8 identities x 5 images, targets stored at
    twice the training resolution, as photos are larger than the training size), and one training session whose
    face-ID loss is loaded when a face pack is given (its λ is switched per variant). Samples of one batch that share
    an image compute its features once; with 8 identities that is rare, as it is in a real data set."""
    models = scaled_spec(settings.scale)
    spec = models.spec
    rng = np.random.default_rng(seed)
    face_root, face_model = settings.face_pack if settings.face_pack else (None, "synthetic")
    face_dim = face_pack_embed_dim(*settings.face_pack) if settings.face_pack else ARCFACE_DIM
    identities = make_identities(8, face_dim, rng)
    images = make_images(identities, NUM_REFS + 1, workdir / "images", spec.resolution, rng, image_scale=2)
    cache = write_synthetic_cache(workdir / "cache", [image for group in images.values() for image in group],
                                  face_dim, face_model)
    base = save_base_model(build_base_components(spec, seed), workdir / "base")
    clip = write_clip_vision(workdir / "clip", spec.clip_vision, seed)
    config = resolve_config(None, dict(
        cache=str(cache), output_dir=str(workdir / "out"), pretrained=str(base), clip_vision=str(clip),
        num_refs=NUM_REFS, mff_width=models.mff_width, mff_heads=models.mff_heads, batch_size=settings.batch_size,
        resolution=spec.resolution, seed=seed, log_with="none", identity_dropout=0.0,
        face_id_weight=FACE_ID_WEIGHT if face_root else 0.0, insightface_root=str(face_root) if face_root else None,
        face_det_size=32 * round(640 * settings.scale.resolution / 32),
    ))
    session = TrainingSession(config)
    cached, recomputed = session.features, session.frozen_features(session.cache, enabled=False)
    fill(cached)
    return Setup(session, cached, recomputed, face_root is not None)


def face_pack_embed_dim(root: Path, name: str) -> int:
    from idadapter_core.face import load_face_analyzer

    return load_face_analyzer(root, name, "CPU").embed_dim


def fill(features: FrozenFeatures) -> None:
    """Compute every target latent and reference feature of the cache once: the steady state of a long run."""
    rows = range(len(features.cache))
    features.latents([Sample(index=0, row=row, references=(), keep_identity=True, flip=False, seed=0) for row in rows])
    features.references([tuple(ReferenceKey(row) for row in rows)])


VARIANTS = (("cached", True), ("recomputed", False))


def variant_name(cached: bool, face_id: bool) -> str:
    return f"{'cached' if cached else 'recomputed'}, λ={FACE_ID_WEIGHT if face_id else 0}"


def measure(setup: Setup, settings: Settings) -> dict:
    """Interleaved timing of the variants, and the FLOPs of one step of each as the trainer runs it."""
    session = setup.session
    counter = itertools.count()
    losses: dict[str, list[dict]] = {}

    def runner(features: FrozenFeatures, weight: float, name: str) -> Variant:
        def prepare() -> None:
            session.step_module.face_id_weight = weight

        def run() -> None:
            for _ in range(settings.steps_per_run):
                losses.setdefault(name, []).append(session.step(next(counter), features))

        return Variant(name, run, prepare)

    variants = []
    for face_id in ((False, True) if setup.face_id else (False,)):
        weight = FACE_ID_WEIGHT if face_id else 0.0
        for _, cached in VARIANTS:
            features = setup.cached if cached else setup.recomputed
            variants.append(runner(features, weight, variant_name(cached, face_id)))
    step_flops = {}
    for variant in variants:
        variant.prepare()
        step_flops[variant.name] = count_flops(variant.run) / (settings.steps_per_run * settings.batch_size)
    computed_before = setup.cached.computed
    times = interleaved_times(variants, settings.rounds, settings.warmup)
    samples = settings.steps_per_run * settings.batch_size
    return dict(
        seconds=times, samples_per_run=samples, step_gflops_per_sample={k: v / 1e9 for k, v in step_flops.items()},
        cached_features_computed_while_timed=setup.cached.computed - computed_before,
        face_id_gate_open=sum(l.get("face_id_gate_open", 0.0) for runs in losses.values() for l in runs),
    )


def summarize(settings: Settings, real: PartFlops, scaled: PartFlops, measured: dict, face_id: bool) -> dict:
    rows = []
    for with_face_id in ((False, True) if face_id else (False,)):
        cached, recomputed = variant_name(True, with_face_id), variant_name(False, with_face_id)
        times = measured["seconds"]
        per_round = [r / c for c, r in zip(times[cached], times[recomputed])]
        flops = measured["step_gflops_per_sample"]
        rows.append(dict(
            face_id_weight=FACE_ID_WEIGHT if with_face_id else 0.0,
            cached_samples_per_s=measured["samples_per_run"] / statistics.median(times[cached]),
            recomputed_samples_per_s=measured["samples_per_run"] / statistics.median(times[recomputed]),
            measured_ratio=statistics.median(per_round), ratio_range=[min(per_round), max(per_round)],
            fastest_ratio=min(times[recomputed]) / min(times[cached]),
            expected_ratio_real=real.expected_ratio(with_face_id),
            expected_ratio_scaled=scaled.expected_ratio(with_face_id),
            expected_ratio_real_every_face=real.expected_ratio(with_face_id, gate_rate=1.0),
            step_flop_ratio=flops[recomputed] / flops[cached],
            goal="PASS" if statistics.median(per_round) >= GOAL else "MISS",
        ))
    return dict(settings={**asdict(settings), "face_pack": [str(p) for p in settings.face_pack or ()]},
                torch=torch.__version__, real_gflops={k: v / 1e9 for k, v in asdict(real).items()},
                scaled_gflops={k: v / 1e9 for k, v in asdict(scaled).items()}, measured=measured, results=rows,
                load_average_1min=list(os.getloadavg()[:1]))


# ---- report ------------------------------------------------------------------------------------------------------

PART_LABELS = (
    ("step", "trained step: MFF, text encoder, UNet + adapters (fwd+bwd)"),
    ("face_id_gate", "face-ID loss: VAE decode of x̂0 for the gate (fwd)"),
    ("face_id_decode", "face-ID loss: the decode with gradients (fwd+bwd), if a face"),
    ("clip_references", f"frozen: CLIP vision of {NUM_REFS} reference crops"),
    ("vae_encode", "frozen: VAE encode of the target"),
)


def print_table(summary: dict) -> None:
    s, real, scaled = summary["settings"], summary["real_gflops"], summary["scaled_gflops"]
    scale = Scale(**s["scale"])
    spec = scaled_spec(scale).spec
    print(f"\nTraining throughput, frozen features cached ÷ recomputed every step. Models: SD1.5 + ViT-H/14 + sd15 "
          f"adapter at 512 px with widths x {scale.width:g} and resolution x {scale.resolution:g} "
          f"({spec.resolution} px, {spec.text_tokens} text tokens, CLIP at {spec.clip_vision['image_size']} px), "
          f"random weights, fp32 CPU ({torch.get_num_threads()} threads), batch {s['batch_size']}, N = {NUM_REFS} "
          f"references; {s['rounds']} interleaved rounds of "
          f"{s['steps_per_run']} step(s) after {s['warmup']} warm-up.\n")
    width = max(len(label) for _, label in PART_LABELS) + 2
    print(f"{'GFLOPs per sample':<{width}}{'real':>12}{'share':>8}{'scaled':>12}{'share':>8}")
    real_total, scaled_total = sum(real.values()), sum(scaled.values())
    for key, label in PART_LABELS:
        print(f"{label:<{width}}{real[key]:>12.1f}{real[key] / real_total:>8.1%}{scaled[key]:>12.2f}"
              f"{scaled[key] / scaled_total:>8.1%}")
    print()
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("samples/s, cached", lambda r: f"{r['cached_samples_per_s']:.3f}"),
        ("samples/s, recomputed every step", lambda r: f"{r['recomputed_samples_per_s']:.3f}"),
        ("measured ratio, median of rounds [range]",
         lambda r: f"{r['measured_ratio']:.3f} [{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}]"),
        ("fastest ÷ fastest", lambda r: f"{r['fastest_ratio']:.3f}"),
        ("expected from FLOPs, real layouts", lambda r: f"{r['expected_ratio_real']:.3f}"),
        ("expected from FLOPs, scaled layouts", lambda r: f"{r['expected_ratio_scaled']:.3f}"),
        ("expected, real, a face in every x̂0", lambda r: f"{r['expected_ratio_real_every_face']:.3f}"),
        ("FLOP ratio of the trainer's step as run", lambda r: f"{r['step_flop_ratio']:.3f}"),
        (f"goal: measured ratio >= {GOAL}", lambda r: r["goal"]),
    ]
    label_width = max(len(label) for label, _ in rows) + 2
    print(" " * label_width + "".join(f"{'λ = ' + format(r['face_id_weight'], 'g'):>24}" for r in summary["results"]))
    for label, cell in rows:
        print(f"{label:<{label_width}}" + "".join(f"{cell(r):>24}" for r in summary["results"]))
    measured = summary["measured"]
    print(f"\nCached features computed while timed: {measured['cached_features_computed_while_timed']} (0: steady "
          f"state). Face-ID gate opened {measured['face_id_gate_open']:.0f} times (random weights draw no faces; the gate's "
          "decode and detector run every step regardless, the decode with gradients only for a face). Load average "
          "(1 min) at the end: "
          f"{summary['load_average_1min'][0]:.1f} on {os.cpu_count()} CPUs.")
    print("The FLOP expectations count neither the recomputed variant's image loading and resizing (measured) nor "
          "the face-ID gate's detector (onnxruntime, not torch; measured) nor, when a face is found, the recognizer.")
    if len(summary["results"]) == 1:
        print("No insightface pack: the face-ID loss (the paper's recipe) was not measured; pass --insightface-root.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of batch 1: a couple of minutes")
    parser.add_argument("--width", type=float, default=0.25, help="width scale w (resolution x sqrt(w)); default 1/4")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--batch-size", type=int, help="samples per step (default 2; 1 with --quick)")
    parser.add_argument("--insightface-root", type=Path, default=DEFAULT_FACE_PACK[0],
                        help="folder with models/<face-model>/ for the face-ID loss "
                             "(default: ../shared/assets/insightface)")
    parser.add_argument("--face-model", default=DEFAULT_FACE_PACK[1], help="insightface pack name")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared cores, more threads stall at OpenMP barriers "
                             "whenever another process holds a core, which swamps the ratio with noise)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pack = (args.insightface_root, args.face_model)
    if not (args.insightface_root / "models" / args.face_model).is_dir():
        log.warning("no insightface pack at %s: measuring without the face-ID loss", args.insightface_root / "models" /
                    args.face_model)
        pack = None
    settings = Settings(scale=Scale(args.width, math.sqrt(args.width)), rounds=args.rounds or (2 if args.quick else 5),
                        warmup=args.warmup,
                        batch_size=args.batch_size or (1 if args.quick else 2), steps_per_run=1, face_pack=pack)
    log.info("counting the real layouts' FLOPs on the meta device")
    real, scaled = part_flops(scaled_spec(REAL)), part_flops(scaled_spec(settings.scale))
    with tempfile.TemporaryDirectory() as folder:
        log.info("writing the scaled models and a synthetic cache")
        setup = build_setup(settings, Path(folder))
        summary = summarize(settings, real, scaled, measure(setup, settings), setup.face_id)
    print_and_write(summary, print_table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
