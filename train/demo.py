"""Run the whole trainer on tiny models built in code: prepare -> fit -> export -> eval, on the CPU in about a minute.

    python -m train demo [--out demo_output] [--steps 30]
    python -m train demo --photos DIR --insightface-root ROOT [--face-model antelopev2]

Nothing is downloaded. The demo builds (train/tiny_models.py, train/tiny_face_models.py) a tiny SD1.5-like diffusers
folder and a tiny CLIP vision folder with random weights, and takes its photos from, in this order:
1. `--photos DIR` with `--insightface-root ROOT`: your photos, analysed by your insightface pack;
2. ../shared/assets/faces beside the repository with the insightface pack in ../shared/assets/insightface (the
   project's test photos), when both are there and `--synthetic` is not given;
3. synthetic identities: "faces" (red squares with an identity's own marks) that the tiny insightface pack it builds
   (a detector that finds red squares, a random recognizer) detects and embeds.
A folder of identity subfolders is used as it is; a flat folder of photos is grouped by file name (the name up to its
first digit, '_' or '-': obama.jpg, obama2.jpg and obama_partial_face.jpg are one person).

Then the same code as the commands: `prepare` (min-images 1: a person with one usable photo is kept), `fit` for
--steps steps (N = 4 references, λ = 0.1 face-ID loss, a sample grid at the end), `export` (fp16) and `eval` on the
training photos with two prompts. The models are random, so the images are noise and the ID similarity table says "no face": the demo
shows the pipeline and where each result goes; the README's "Training" section runs the same commands on real models.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idadapter_core.errors import IDAdapterError
from idadapter_core.face import load_face_analyzer
from idadapter_core.weights import atomic_write

from .config import resolve_config
from .eval import EvalResult, collect_references, evaluate, is_image_file, load_eval_models
from .export import export_checkpoint
from .fit import TrainResult, train
from .generate import SamplingSettings
from .prepare import IMAGE_EXTENSIONS, PrepareReport, prepare_dataset
from .tiny_face_models import write_model_pack, write_synthetic_identities
from .tiny_models import write_tiny_clip_vision, write_tiny_pipeline

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO_ROOT.parent / "shared" / "assets"
MARKER = ".idadapter-demo"
"""Marks a folder as the demo's own, so a re-run may replace what it wrote there."""
OUTPUTS = ("models", "photos", "photos.jsonl", "cache", "run", "eval", "idadapter-demo.safetensors", "report.md")
PROMPTS = ("a portrait photo", "a photo of a person smiling outdoors")
"""Words of the tiny tokenizer's vocabulary (train/tiny_models.py), so each is a handful of tokens."""
TINY_FACE_PACK = "tiny_pack"
RESOLUTION = 32
"""Training and generation size (the tiny VAE turns it into 16x16 latents)."""
LOSS_WINDOW = 5


class DemoError(IDAdapterError):
    """The demo's options or output folder cannot be used."""


@dataclass
class PhotoSource:
    dataset: Path
    """What `prepare` and `eval` read: a folder of identity subfolders or a JSONL manifest."""
    insightface_root: Path
    face_model: str
    det_size: int
    description: str


@dataclass
class DemoResult:
    out: Path
    photos: PhotoSource
    prepared: PrepareReport
    trained: TrainResult
    weights: Path
    evaluation: EvalResult
    report: Path
    seconds: float


# ---------------------------------------------------------------------------------------------------- the photos


def identity_of(file_name: str) -> str:
    """A flat folder's identity of a photo: its name up to the first digit, '_' or '-' (the whole name if that
    leaves nothing)."""
    stem = Path(file_name).stem
    return re.split(r"[\d_\-\s]", stem, maxsplit=1)[0] or stem


def photo_dataset(photos: Path, out: Path) -> tuple[Path, str]:
    """`photos` as `prepare` reads it: as it is when it has identity subfolders, else a manifest in `out` grouping its
    photos by `identity_of` (the photos are not copied). Returns the dataset and a description."""
    subfolders = [p for p in sorted(photos.iterdir()) if p.is_dir() and any(is_image_file(f) for f in p.iterdir())]
    if subfolders:
        return photos, f"{len(subfolders)} identity folders in {photos}"
    files = sorted(p for p in photos.iterdir() if is_image_file(p))
    if not files:
        raise DemoError(f"no photos ({', '.join(IMAGE_EXTENSIONS)}) in {photos}")
    manifest = out / "photos.jsonl"
    lines = "".join(json.dumps({"image": str(p.resolve()), "identity": identity_of(p.name)}) + "\n" for p in files)
    atomic_write(manifest, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
    people = sorted({identity_of(p.name) for p in files})
    return manifest, f"{len(files)} photos of {len(people)} people ({', '.join(people)}) in {photos}"


def only_pack(root: Path) -> str:
    """The name of the one model pack in `root/models`."""
    packs = sorted(p.name for p in (root / "models").glob("*") if p.is_dir()) if (root / "models").is_dir() else []
    if len(packs) != 1:
        found = ", ".join(packs) or "none"
        raise DemoError(f"{root}/models holds {len(packs)} insightface packs ({found}); name one with --face-model")
    return packs[0]


def choose_photos(args: argparse.Namespace, out: Path) -> PhotoSource:
    if args.photos is not None:
        dataset, described = photo_dataset(args.photos, out)
        face_model = args.face_model or only_pack(args.insightface_root)
        return PhotoSource(dataset, args.insightface_root, face_model, 640,
                           f"your photos: {described}, face model '{face_model}'")
    shared_faces, shared_root = SHARED_ASSETS / "faces", SHARED_ASSETS / "insightface"
    if not args.synthetic and shared_faces.is_dir() and (shared_root / "models").is_dir():
        dataset, described = photo_dataset(shared_faces, out)
        face_model = only_pack(shared_root)
        return PhotoSource(dataset, shared_root, face_model, 640,
                           f"real photos: {described}, face model '{face_model}' from {shared_root}")
    root = out / "models" / "insightface"
    write_model_pack(root, TINY_FACE_PACK)
    people = write_synthetic_identities(out / "photos")
    why = "--synthetic" if args.synthetic else f"no photos at {shared_faces}"
    count = sum(len(files) for files in people.values())
    return PhotoSource(out / "photos", root, TINY_FACE_PACK, 320,
                       f"synthetic photos ({why}): {count} images of {len(people)} identities in {out / 'photos'}, "
                       "tiny insightface pack (finds red squares)")


# ---------------------------------------------------------------------------------------------------- the run


def claim_output(out: Path) -> None:
    """Make `out` the demo's folder: a new or empty one, or one a previous demo wrote (its outputs are replaced)."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DemoError(f"{out} exists and was not written by the demo; choose another --out or empty it")
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `python -m train demo`; a re-run replaces its outputs here\n",
                              encoding="utf-8")


def run_demo(args: argparse.Namespace) -> DemoResult:
    start = time.perf_counter()
    out = Path(args.out)
    claim_output(out)
    log.info("building tiny models in %s", out / "models")
    pipeline = write_tiny_pipeline(out / "models" / "sd15-tiny", seed=args.seed)
    clip = write_tiny_clip_vision(out / "models" / "clip-vision-tiny", seed=args.seed)
    photos = choose_photos(args, out)
    log.info("photos: %s", photos.description)

    analyzer = load_face_analyzer(photos.insightface_root, photos.face_model, "CPU", photos.det_size)
    prepared = prepare_dataset(photos.dataset, out / "cache", analyzer, min_images=1, augmentations=2)

    config = resolve_config(None, dict(
        cache=str(out / "cache"), output_dir=str(out / "run"), pretrained=str(pipeline), clip_vision=str(clip),
        insightface_root=str(photos.insightface_root), face_det_size=64, face_min_size=8, num_refs=4, mff_width=32,
        mff_heads=4, batch_size=2, max_steps=args.steps, checkpoint_every=args.steps, keep_checkpoints=1,
        resolution=RESOLUTION, lr=1e-3, seed=args.seed, log_with="tensorboard", sample_every=args.steps,
        sample_prompts=list(PROMPTS), sample_steps=10,
    ))
    trained = train(config)
    weights = export_checkpoint(out / "run", out / "idadapter-demo.safetensors", dtype="fp16")

    models = load_eval_models(weights, clip, photos.insightface_root, pretrained=str(pipeline),
                              face_model=photos.face_model, det_size=photos.det_size, device="cpu", dtype="fp32")
    evaluation = evaluate(models, collect_references(photos.dataset), PROMPTS, out / "eval",
                          SamplingSettings(RESOLUTION, steps=10, guidance=5.0), seeds=(args.seed,))
    seconds = time.perf_counter() - start
    result = DemoResult(out, photos, prepared, trained, weights, evaluation, out / "report.md", seconds)
    text = report(result)
    atomic_write(result.report, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    log.info("demo finished in %.0f s; its report (%s):\n\n%s", seconds, result.report, text)
    return result


def loss_summary(losses: list[dict[str, float]], key: str = "diffusion_loss") -> dict[str, float]:
    """The first and last step's value of `key`, and its means over the first and last LOSS_WINDOW steps."""
    values = [step[key] for step in losses]
    window = min(LOSS_WINDOW, len(values))
    return {"first": values[0], "last": values[-1], "first_mean": float(np.mean(values[:window])),
            "last_mean": float(np.mean(values[-window:])), "window": window}


def report(result: DemoResult) -> str:
    """The demo's report as markdown: what it used, the losses, where everything is, the ID similarity table."""
    losses = loss_summary(result.trained.losses)
    samples = sum(step.get("face_id_samples", 0.0) for step in result.trained.losses)
    opened = sum(step.get("face_id_gate_open", 0.0) for step in result.trained.losses)
    prepared, evaluation = result.prepared, result.evaluation
    summary = evaluation.summary()
    sample_grids = sorted((result.out / "run" / "samples").glob("*.png"))
    lines = [
        "# IDAdapter trainer demo", "",
        f"- photos: {result.photos.description}",
        f"- prepare: kept {prepared.kept_images} images of {prepared.kept_identities} identities, skipped "
        f"{len(prepared.skipped)} image(s)" + "".join(f"; {s.image}: {s.reason}" for s in prepared.skipped)
        + f" (cache {result.out / 'cache'})",
        f"- fit: {result.trained.step} steps; diffusion loss {losses['first']:.4f} at step 1 -> {losses['last']:.4f} at "
        f"step {result.trained.step} (means of the first / last {losses['window']} steps: {losses['first_mean']:.4f} -> "
        f"{losses['last_mean']:.4f}); face-ID loss gate open on {opened:.0f} of {samples:.0f} samples",
        f"- checkpoint: {result.trained.checkpoint}",
        f"- sample grid (references | generations): {sample_grids[-1] if sample_grids else 'none'}",
        f"- TensorBoard logs: {result.out / 'run' / 'logs'}",
        f"- weights: {result.weights} ({result.weights.stat().st_size / 1e6:.2f} MB, fp16; loaded back by eval)",
        f"- generated images: {result.out / 'eval' / 'images'}, grid {result.out / 'eval' / 'grid.png'}",
        f"- ID similarity table: {result.out / 'eval' / 'similarity.md'} (and .csv, summary.json)",
        "", "## ID similarity (ArcFace cosine to the identity's mean reference face)", "",
        "| identity | prompt | seed | similarity |", "|---|---|---|---|",
    ]
    lines += [f"| {row.identity} | {row.prompt} | {row.seed} | "
              f"{'no face' if row.similarity is None else f'{row.similarity:.4f}'} |" for row in evaluation.rows]
    mean = summary["mean_similarity"]
    lines += ["", f"Mean: {'no face in any image' if mean is None else f'{mean:.4f}'} ({summary['images_with_face']} "
                  f"of {summary['images']} images with a face)."]
    own = {name: entry["reference_similarity"] for name, entry in summary["identities"].items()}
    lines.append("References' own similarity (each photo's face to the mean of the others'): " + ", ".join(
        f"{name} {'-' if value is None else f'{value:.4f}'}" for name, value in own.items()) + ".")
    lines += ["", f"Tiny random models generate noise, so no face is expected in the images; with real models the "
                  f"same commands fill this table (README, \"Training\"). Finished in {result.seconds:.0f} s."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny models, the training and the images")
    parser.add_argument("--photos", type=Path,
                        help="your photos: a folder of identity subfolders, or a flat folder grouped by file name")
    parser.add_argument("--insightface-root", type=Path, help="with --photos: folder holding models/<name>/*.onnx")
    parser.add_argument("--face-model", help="with --photos: the insightface pack (default: the only one there)")
    parser.add_argument("--synthetic", action="store_true",
                        help="use synthetic photos and the tiny face models even when real photos are found")


def run(args: argparse.Namespace) -> DemoResult:
    if args.steps < 1:
        raise DemoError(f"--steps must be at least 1, got {args.steps}")
    if args.photos is not None:
        if args.insightface_root is None:
            raise DemoError("--photos needs --insightface-root: real photos are analysed with a real insightface "
                            "pack (root/models/<name>/*.onnx), the tiny one only finds red squares")
        if not args.photos.is_dir():
            raise DemoError(f"--photos {args.photos} is not a folder")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small run fastest on one thread (several only wait on each other)
    try:
        return run_demo(args)
    finally:
        torch.set_num_threads(threads)
