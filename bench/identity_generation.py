"""Identity in generated images, in miniature: do IDAdapter and Inv-Adapter make a tiny base model draw the
referenced person, as the pack's own Face Similarity measure sees it? On CPU, in minutes.

World (synthetic, from a fixed seed): a "face" is what the tiny insightface pack of the demo
(train/tiny_face_models.py) detects and recognises: a pure-red square, here 16 px in a 32 px photo, centred, with
`marks` coloured cells of a 4x4 grid on it; an identity is its cells and their colours (reds mixed with some green
and blue, so the square stays red enough to be detected). A photo jitters the background and the brightness.

Base model (not what is measured, so trained once and cached in --workdir, shared by every seed): the tiny
SD-like parts of bench/identity_learning.py at 32 px; first the VAE is trained as an autoencoder (its posterior
near-deterministic), then the UNet on photos of `base_identities` identities with the plain caption, so it draws
faces in general and none in particular.

Per seed: `train_identities` new identities train the adapter, `held_out_identities` other new ones are never
seen in adapter training (nor by the base). The adapter's data goes through the trainer's own `prepare` (the tiny
pack detects, aligns and embeds the photos) and its own training step (bench/identity_learning.py's session: IDAdapter
at the full setting; Inv-Adapter with forward-noised references). Then for each held-out identity, images are
generated from its references (IDAdapter: N references, DDIM with CFG through train/generate.py; Inv-Adapter: one
reference, DDIM with the reference pass at each step's timestep) and scored with `identity_similarity` (the Face
Similarity node's measure): the cosine of each generated face to the identity's mean reference face, and to each
other held-out identity's. margin = similarity to the matching identity - mean similarity to the others; positive
when the generations carry the referenced identity. The same on as many training identities (references: their
training photos) shows whether the adapter path carries identity at all. Baselines: the base model's generations (no
adapter), whose margin is 0, and the references' own leave-one-out margin, the ceiling. Also reported: how much the
references change the images at all (`conditioning_effect`: pixel change across identities ÷ across sampling seeds).

Run: `python bench/identity_generation.py [--quick] [--seeds 3] [--steps 200] [--lr 2e-3] [--workdir
/tmp/identity-generation] [--images DIR] [--json PATH]` (on a 2-core machine shared with other jobs, 2026-12-06: the
base model about 10 minutes, once; then about 10 minutes a seed). Prints a table and exits 0 (it is a report).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from bench.identity_learning import (  # noqa: E402
    CAPTION, TINY_SPEC, Session, build_base_components, frozen_features, method_configs, pretrain_base,
    save_base_model, spread, start_session, train_step, write_clip_vision,
)
from idadapter_core.face import FaceAnalyzer, load_face_analyzer  # noqa: E402
from idadapter_core.face.similarity import identity_similarity  # noqa: E402
from train.cache import TrainCache  # noqa: E402
from train.config import resolve_config  # noqa: E402
from train.data import FrozenFeatures, ReferenceKey, Sample  # noqa: E402
from train.generate import SamplingSettings, generate_identity_images  # noqa: E402
from train.prepare import prepare_dataset  # noqa: E402
from train.tiny_face_models import write_model_pack  # noqa: E402

log = logging.getLogger("identity_generation")

PHOTO_SIZE = 32
FACE_SIDE = 16
GRID = 4
PACK = "tiny_pack"
DET_SIZE = 64
"""The photo is scaled 2x for detection, where the 16 px square is the tiny detector's stride-8 face."""
METHODS = ("idadapter", "inv-adapter")
GENERATION_SPEC = replace(TINY_SPEC, vae=dict(
    block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4, norm_num_groups=8, layers_per_block=1, mid_block_add_attention=False,
))
"""bench/identity_learning.py's tiny parts (32 px, 8x8 latents) with a narrower VAE without attention: it is
trained here, and this one learns to reconstruct the faces in about a minute."""


# ---- the synthetic world -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FaceIdentity:
    name: str
    cells: tuple[int, ...]
    """Cells of the 4x4 grid on the face (row-major) that carry a mark."""
    colours: tuple[tuple[int, int, int], ...]


def make_face_identities(count: int, marks: int, rng: np.random.Generator, prefix: str) -> list[FaceIdentity]:
    """Identities with `marks` distinct cells each, coloured (255, g, b) with g, b < 220: the square stays red
    enough for the tiny detector (its redness test), and the marks differ enough for the random recognizer."""
    identities = []
    for index in range(count):
        cells = tuple(int(c) for c in rng.choice(GRID * GRID, marks, replace=False))
        colours = tuple((255, int(g), int(b)) for g, b in rng.integers(0, 220, (marks, 2)))
        identities.append(FaceIdentity(f"{prefix}{index:02d}", cells, colours))
    return identities


def draw_face(identity: FaceIdentity, rng: np.random.Generator) -> np.ndarray:
    """(32, 32, 3) uint8: the identity's face centred (where the detector's anchors are) on a random grey."""
    image = np.full((PHOTO_SIZE, PHOTO_SIZE, 3), rng.uniform(60, 200), np.float32) + rng.normal(0, 8, 3)
    start = (PHOTO_SIZE - FACE_SIDE) // 2
    face = image[start:start + FACE_SIDE, start:start + FACE_SIDE]
    face[:] = (255, 0, 0)
    cell = FACE_SIDE // GRID
    for index, colour in zip(identity.cells, identity.colours):
        row, column = divmod(index, GRID)
        face[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell] = colour
    return np.clip(image * rng.uniform(0.95, 1.05), 0, 255).round().astype(np.uint8)


def write_photos(identities: list[FaceIdentity], per_identity: int, folder: Path,
                 rng: np.random.Generator) -> dict[str, list[Path]]:
    """folder/<identity>/<i>.png, as `prepare` reads a data set."""
    written = {}
    for identity in identities:
        (folder / identity.name).mkdir(parents=True, exist_ok=True)
        written[identity.name] = []
        for index in range(per_identity):
            path = folder / identity.name / f"{index:03d}.png"
            Image.fromarray(draw_face(identity, rng)).save(path)
            written[identity.name].append(path)
    return written


# ---- the base model: autoencoder, then UNet, trained once and cached ----------------------------------------------

def train_autoencoder(vae: torch.nn.Module, pixels: torch.Tensor, steps: int, batch_size: int, lr: float,
                      seed: int) -> float:
    """Train the VAE as a plain autoencoder (reconstruction MSE through the posterior mean; the posterior stays
    near-deterministic): generation needs a decoder that inverts the encoder. Returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    loss = torch.tensor(math.nan)
    for _ in tqdm(range(steps), desc="autoencoder", leave=False):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        loss = F.mse_loss(vae.decode(vae.encode(batch).latent_dist.mean).sample, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    vae.eval()
    return float(loss.detach())


@dataclass
class Settings:
    marks: int = 2
    base_identities: int = 64
    base_photos: int = 8
    """Per base identity."""
    autoencoder_steps: int = 300
    autoencoder_lr: float = 5e-3
    base_steps: int = 800
    base_batch_size: int = 16
    base_lr: float = 2e-3
    train_identities: int = 16
    held_out_identities: int = 8
    photos: int = 8
    """Per adapter identity (training and held out alike)."""
    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-3
    num_refs: int = 4
    mff_width: int = 32
    identity_dropout: float = 0.1
    inversion_steps: int = 25
    generations: int = 4
    """Images per identity and method (each its own sampling seed)."""
    sampling_steps: int = 20
    guidance: float = 3.0
    world_seed: int = 1234
    """Seed of the base model and its identities (the same for every bench seed)."""

    def base_key(self) -> str:
        fields = ("marks", "base_identities", "base_photos", "autoencoder_steps", "autoencoder_lr", "base_steps",
                  "base_batch_size", "base_lr", "world_seed")
        return hashlib.sha256(json.dumps([getattr(self, f) for f in fields]).encode()).hexdigest()[:12]


TRAINED_FILE = "trained.json"
"""Written last into a cached base model's folder: its training time and settings."""


def tiny_base(settings: Settings, workdir: Path) -> Path:
    """The cached base model folder (trained here the first time, for these settings)."""
    folder = workdir / f"base-{settings.base_key()}"
    if (folder / TRAINED_FILE).is_file():
        log.info("base model: cached %s", folder)
        return folder
    started = time.perf_counter()
    rng = np.random.default_rng(settings.world_seed)
    identities = make_face_identities(settings.base_identities, settings.marks, rng, "base")
    photos = write_photos(identities, settings.base_photos, workdir / f"base-photos-{settings.base_key()}", rng)
    paths = [path for group in photos.values() for path in group]
    parts = build_base_components(GENERATION_SPEC, settings.world_seed)
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
    loss = train_autoencoder(parts.vae, pixels.float() / 127.5 - 1.0, settings.autoencoder_steps,
                             settings.base_batch_size, settings.autoencoder_lr, settings.world_seed)
    log.info("base model: autoencoder trained, reconstruction MSE %.4f (pixels in [-1, 1])", loss)
    losses = pretrain_base(parts, paths, PHOTO_SIZE, settings.base_steps, settings.base_batch_size, settings.base_lr,
                           settings.world_seed)
    log.info("base model: UNet trained, ε-MSE of the last 50 steps %.4f", statistics.fmean(losses[-50:]))
    save_base_model(parts, folder)
    seconds = time.perf_counter() - started
    record = dict(seconds=seconds, autoencoder_mse=loss, settings=asdict(settings))
    (folder / TRAINED_FILE).write_text(json.dumps(record))
    log.info("base model: trained in %.0f s, cached in %s", seconds, folder)
    return folder


# ---- per seed: the adapters' data, training and generations ------------------------------------------------------

@dataclass
class AdapterData:
    train_cache: TrainCache
    held_out_cache: TrainCache
    """Only the references of the held-out identities (never trained on)."""
    photos: dict[str, list[Path]]
    """Every adapter identity's photos: the references Face Similarity compares generations with."""
    scored: dict[str, list[str]]
    """'held-out' and 'training': the identities generated and scored, each group compared within itself."""


def prepare_adapter_data(seed: int, settings: Settings, analyzer: FaceAnalyzer, folder: Path) -> AdapterData:
    """New identities for the seed, photographed and put through the trainer's `prepare` with the tiny pack."""
    rng = np.random.default_rng(seed)
    training = make_face_identities(settings.train_identities, settings.marks, rng, "train")
    held_out = make_face_identities(settings.held_out_identities, settings.marks, rng, "held")
    photos = {**write_photos(training, settings.photos, folder / "train-photos", rng),
              **write_photos(held_out, settings.photos, folder / "held-out-photos", rng)}
    caches = {}
    for name in ("train", "held-out"):
        report = prepare_dataset(folder / f"{name}-photos", folder / f"{name}-cache", analyzer, min_face_size=8,
                                 min_images=1, augmentations=0)
        if report.skipped:
            log.warning("seed %d: prepare skipped %d of the %s photos (%s)", seed, len(report.skipped), name,
                        report.skipped[0].reason)
        caches[name] = TrainCache(folder / f"{name}-cache")
    return AdapterData(caches["train"], caches["held-out"], photos,
                       {"held-out": [i.name for i in held_out], "training": [i.name for i in training[:len(held_out)]]})


def identity_rows(cache: TrainCache, identity: str) -> list[int]:
    return [record.row for record in cache.identities()[identity]]


def sampling_settings(settings: Settings) -> SamplingSettings:
    """The negative prompt is the plain caption: the input identity dropout trains (E_r = 0, no identity suffix)."""
    return SamplingSettings(PHOTO_SIZE, settings.sampling_steps, settings.guidance, negative_prompt=CAPTION)


def generate_idadapter(session: Session, features: FrozenFeatures, rows: list[int], settings: Settings,
                       seeds: list[int]) -> np.ndarray:
    """(len(seeds), 32, 32, 3) uint8 from the identity's first N photos as references (train/generate.py)."""
    step_module = session.step_module
    references = tuple(ReferenceKey(row) for row in rows[:settings.num_refs])
    step_module.eval()
    try:
        return generate_identity_images(step_module.frozen.base, step_module.adapter, step_module.frozen.binding,
                                        features.references([references]), [CAPTION] * len(seeds), "person", seeds,
                                        sampling_settings(settings))
    finally:
        step_module.train()


@torch.no_grad()
def generate_inv_adapter(session: Session, features: FrozenFeatures, rows: list[int], settings: Settings,
                         seeds: list[int], weight: float = 1.0) -> np.ndarray:
    """(len(seeds), 32, 32, 3) uint8: DDIM with the plain caption, the identity's first photo as the reference,
    forward-noised to each step's timestep (as trained) for the reference pass on the null prompt; no guidance
    (Inv-Adapter has no input without identity to guide against). weight 0: the base model alone."""
    from diffusers import DDIMScheduler

    step_module = session.step_module
    base, binding = step_module.frozen.base, step_module.frozen.binding
    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(settings.sampling_steps)
    count = len(seeds)
    context, _ = base.text.encode(base.text.tokenize([CAPTION] * count, [""] * count, [False] * count))
    null_context, _ = base.text.encode(base.text.tokenize([""], [""], [False]))
    scale = base.vae.config.scaling_factor
    reference = features.latents([Sample(0, rows[0], (), True, False, 0)])["mean"] * scale
    reference_noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(seeds[0] + 7))
    latents = torch.cat([torch.randn(reference.shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    binding.weight = weight
    try:
        for timestep in scheduler.timesteps:
            noisy_reference = base.noise_scheduler.add_noise(reference, reference_noise, timestep.reshape(1))
            binding.set_reference(binding.record_reference(noisy_reference, timestep, null_context))
            epsilon = base.unet(latents, timestep, encoder_hidden_states=context).sample
            latents = scheduler.step(epsilon, timestep, latents).prev_sample
    finally:
        binding.set_reference(None)
        binding.weight = 1.0
    images = base.vae.decode(latents / scale).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@dataclass
class Margins:
    """Face Similarity of generations to their own identity's references and to the other identities' (same group)."""

    matching: float
    others: float
    faces: int
    """Generations with a detected face (the others are left out of the means)."""
    images: int
    effect: float = math.nan
    """`conditioning_effect` of the generations (nan for the reference photos)."""

    @property
    def margin(self) -> float:
        return self.matching - self.others


def score(analyzer: FaceAnalyzer, generations: dict[str, np.ndarray], photos: dict[str, list[Path]]) -> Margins:
    """`identity_similarity` (the Face Similarity node's measure) of each identity's generations against every
    identity's photos of the group."""
    references = {name: [np.asarray(Image.open(p).convert("RGB")) for p in photos[name]] for name in generations}
    matching, others, faces, images = [], [], 0, 0
    for name, generated in generations.items():
        scores = {other: identity_similarity(analyzer, references[other], list(generated)).scores
                  for other in generations}
        for index in range(len(generated)):
            images += 1
            if scores[name][index] is None:
                continue
            faces += 1
            matching.append(scores[name][index])
            others.append(statistics.fmean(scores[o][index] for o in generations if o != name))
    mean = lambda values: statistics.fmean(values) if values else math.nan
    return Margins(mean(matching), mean(others), faces, images)


def reference_ceiling(analyzer: FaceAnalyzer, photos: dict[str, list[Path]], names: list[str]) -> Margins:
    """The margin a generation that looks like one more photo reaches: each photo scored as a generation against
    the other photos of its identity (leave one out) and all photos of the others."""
    images = {name: [np.asarray(Image.open(p).convert("RGB")) for p in photos[name]] for name in names}
    matching, others = [], []
    for name in names:
        own = [identity_similarity(analyzer, images[name][:i] + images[name][i + 1:], [image]).scores[0]
               for i, image in enumerate(images[name])]
        rest = [identity_similarity(analyzer, images[other], images[name]).scores for other in names if other != name]
        for index, score in enumerate(own):
            if score is not None and all(scores[index] is not None for scores in rest):
                matching.append(score)
                others.append(statistics.fmean(scores[index] for scores in rest))
    return Margins(statistics.fmean(matching), statistics.fmean(others), len(matching),
                   sum(len(images[name]) for name in names))


def conditioning_effect(generations: dict[str, np.ndarray]) -> float:
    """How much the references change the images at all: the mean absolute pixel difference between identities'
    generations from the same sampling seed, as a fraction of that between sampling seeds of one identity (0: the
    references change nothing; about 1: as much as the starting noise)."""
    images = np.stack([generations[name].astype(np.float32) for name in generations])  # (identity, seed, H, W, 3)
    identities, seeds = images.shape[:2]
    between_identities = statistics.fmean(float(np.abs(images[i] - images[j]).mean())
                                          for i in range(identities) for j in range(i + 1, identities))
    between_seeds = statistics.fmean(float(np.abs(images[:, a] - images[:, b]).mean())
                                     for a in range(seeds) for b in range(a + 1, seeds))
    return between_identities / between_seeds


GENERATORS = {"idadapter": generate_idadapter, "inv-adapter": generate_inv_adapter}


@dataclass
class SeedResult:
    seed: int
    margins: dict[str, dict[str, dict]] = field(default_factory=dict)
    """who ('IDAdapter', 'Inv-Adapter', 'base model alone', 'reference photos') -> group -> Margins as a dict."""
    seconds: float = 0.0


def run_seed(seed: int, settings: Settings, base_folder: Path, analyzer: FaceAnalyzer, workdir: Path,
             images_out: Path | None = None) -> SeedResult:
    started = time.perf_counter()
    shutil.rmtree(workdir, ignore_errors=True)  # a previous run's seed folder
    data = prepare_adapter_data(seed, settings, analyzer, workdir)
    clip_folder = write_clip_vision(GENERATION_SPEC, workdir / "clip", seed)
    configs = method_configs(settings, data.train_cache.path, base_folder, clip_folder, workdir / "out",
                             GENERATION_SPEC, seed)
    result = SeedResult(seed)
    result.margins["reference photos"] = {group: asdict(reference_ceiling(analyzer, data.photos, names))
                                          for group, names in data.scored.items()}
    sample_seeds = [10_000 * seed + k for k in range(settings.generations)]
    for method in METHODS:
        session = start_session(resolve_config(None, configs[method]))
        train_features = frozen_features(session, session.cache)
        for step in tqdm(range(settings.steps), desc=f"seed {seed}: {method}", leave=False):
            train_step(session, train_features, step)
        held_out_features = frozen_features(session, data.held_out_cache)
        label = {"idadapter": "IDAdapter", "inv-adapter": "Inv-Adapter"}[method]
        who = {label: GENERATORS[method]}
        if method == "inv-adapter":
            who["base model alone"] = lambda *args: generate_inv_adapter(*args, weight=0.0)
        for name, generate in who.items():
            result.margins[name] = {}
            for group, names in data.scored.items():
                cache, features = ((data.train_cache, train_features) if group == "training"
                                   else (data.held_out_cache, held_out_features))
                generations = {identity: generate(session, features, identity_rows(cache, identity), settings,
                                                  sample_seeds) for identity in names}
                result.margins[name][group] = asdict(replace(score(analyzer, generations, data.photos),
                                                             effect=conditioning_effect(generations)))
                if images_out is not None:
                    save_grid(generations, images_out / f"seed{seed}-{name.replace(' ', '-')}-{group}.png")
            log.info("seed %d, %s: %s", seed, name, "; ".join(
                f"{group} margin {m['matching'] - m['others']:+.4f} ({m['faces']}/{m['images']} faces)"
                for group, m in result.margins[name].items()))
    result.seconds = time.perf_counter() - started
    return result


def save_grid(generations: dict[str, np.ndarray], path: Path) -> None:
    """One row per identity, 4x enlarged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = np.concatenate([np.concatenate(list(images), axis=1) for images in generations.values()], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


# ---- report ------------------------------------------------------------------------------------------------------

def spread_or_nan(values: list[float]) -> dict[str, float]:
    return spread(values) if values else dict(mean=math.nan, std=math.nan, min=math.nan, max=math.nan)


def summarize(settings: Settings, results: list[SeedResult], base_seconds: float) -> dict:
    table = {}
    for who in results[0].margins:
        for group in results[0].margins[who]:
            entries = [r.margins[who][group] for r in results]
            scored = [e for e in entries if e["faces"]]  # a seed whose generations show no face has no margin
            margins = [e["matching"] - e["others"] for e in scored]
            table[f"{who} | {group}"] = dict(
                margin=spread_or_nan(margins), matching=spread_or_nan([e["matching"] for e in scored]),
                others=spread_or_nan([e["others"] for e in scored]), positive=sum(m > 0 for m in margins),
                effect=spread_or_nan([e["effect"] for e in entries if math.isfinite(e["effect"])]),
                seeds_with_faces=len(scored), faces=sum(e["faces"] for e in entries),
                images=sum(e["images"] for e in entries))
    return dict(settings=asdict(settings), torch=torch.__version__, seeds=[asdict(r) for r in results], table=table,
                base_seconds=base_seconds)


def print_table(summary: dict) -> None:
    s = summary["settings"]
    seeds = summary["seeds"]
    print(f"\nIdentity in generated images, in miniature: {PHOTO_SIZE} px synthetic faces (red squares with "
          f"{s['marks']} coloured marks) that the demo's tiny insightface pack detects and embeds. Base (cached, "
          f"trained once in {summary['base_seconds']:.0f} s): autoencoder {s['autoencoder_steps']} steps, UNet "
          f"{s['base_steps']} steps on {s['base_identities']} identities x {s['base_photos']} photos. Per seed: "
          "adapters trained "
          f"{s['steps']} steps (batch {s['batch_size']}, lr {s['lr']:g}) on {s['train_identities']} new identities x "
          f"{s['photos']} photos; {s['held_out_identities']} held-out identities never trained on. Generation: "
          f"{s['generations']} images per identity, DDIM {s['sampling_steps']} steps (IDAdapter: N = {s['num_refs']}, "
          f"CFG {s['guidance']:g} against the plain caption; Inv-Adapter: one reference, forward-noised, no CFG). "
          "Face Similarity (ArcFace cosine to the identity's mean reference face): margin = to the matching "
          "identity - to the other identities of the group. Seeds "
          f"{', '.join(str(r['seed']) for r in seeds)}: mean ± sample std [min .. max].\n")
    cell = lambda v: f"{v['mean']:+.4f} ± {v['std']:.4f}"
    header = ("generator | identities", "to matching", "to others", "margin", "margin > 0 (seeds)", "faces found",
              "reference effect")
    rows = [(name, cell(v["matching"]), cell(v["others"]),
             f"{cell(v['margin'])} [{v['margin']['min']:+.4f} .. {v['margin']['max']:+.4f}]",
             f"{v['positive']}/{v['seeds_with_faces']}", f"{v['faces']}/{v['images']}",
             "" if math.isnan(v["effect"]["mean"]) else f"{v['effect']['mean']:.3f} ± {v['effect']['std']:.3f}")
            for name, v in summary["table"].items()]
    widths = [max(len(row[i]) for row in [header, *rows]) + 2 for i in range(len(header))]
    for row in [header, *rows]:
        print("".join(f"{text:<{width}}" for text, width in zip(row, widths)))
    print("\n'reference photos': each photo scored as a generation (leave one out), the ceiling; 'base model alone': "
          "the EAA off, no identity, the floor. Reference effect: mean |pixel difference| between identities' "
          "generations from one sampling seed ÷ between one identity's seeds (0: the references change nothing). "
          "Per seed: " + ", ".join(f"seed {r['seed']} {r['seconds']:.0f} s"
                                                                          for r in seeds) + ".")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller base, fewer steps and images (a smoke run)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are FIRST_SEED, FIRST_SEED + 1, ... (default 0)")
    parser.add_argument("--steps", type=int, help=f"adapter training steps (default {Settings.steps})")
    parser.add_argument("--lr", type=float, help=f"adapter learning rate (default {Settings.lr:g})")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/identity-generation"),
                        help="where the base model is cached and each seed's data is written")
    parser.add_argument("--images", type=Path, help="also save the generations here as grids")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


QUICK = dict(base_identities=8, base_photos=2, autoencoder_steps=4, base_steps=4, base_batch_size=4, train_identities=3,
             held_out_identities=2, photos=3, steps=2, batch_size=2, generations=2, sampling_steps=2, inversion_steps=2)
"""Seconds: every part runs, nothing is learned."""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("train.models", "train.prepare", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(**QUICK) if args.quick else Settings()
    settings.steps = args.steps or settings.steps
    settings.lr = args.lr or settings.lr
    workdir = args.workdir
    pack_root = workdir / "insightface"
    if not (pack_root / "models" / PACK).is_dir():
        write_model_pack(pack_root, PACK)
    analyzer = load_face_analyzer(pack_root, PACK, "CPU", DET_SIZE)
    started = time.perf_counter()
    base_folder = tiny_base(settings, workdir)
    base_seconds = float(json.loads((base_folder / TRAINED_FILE).read_text())["seconds"])
    log.info("base ready after %.0f s", time.perf_counter() - started)
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        results.append(run_seed(seed, settings, base_folder, analyzer, workdir / f"seed{seed}", args.images))
        if args.json:  # after every seed, so an interrupted run keeps what it finished
            args.json.write_text(json.dumps(summarize(settings, results, base_seconds), indent=2))
    print_table(summarize(settings, results, base_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
