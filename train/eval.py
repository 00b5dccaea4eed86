"""Evaluate IDAdapter or Inv-Adapter weights: ID similarity of generated images to reference photos (the paper's ID-Sim).

    python -m train eval idadapter.safetensors --pretrained SD_FOLDER --clip-vision CLIP_FOLDER \
        --insightface-root ROOT --references REFS --prompts prompts.txt --out eval/ [--seeds 0 1 2]
    python -m train eval inv_adapter.safetensors --pretrained SD_FOLDER --insightface-root ROOT --face-model NAME \
        --references REFS --prompts prompts.txt --out eval/ [--reference-features noised|inversion|fixed]

For every identity of REFS (one subfolder per identity; a folder of images alone is one identity; or a JSONL manifest
as `prepare` reads) each prompt (a text file, one per line, and/or `--prompt`, repeated) is generated once per seed
through the base model's diffusers pipeline with the method's binding attached (train/generate.py, the code of fit's
sample grids), with classifier-free guidance over the identity unless `--identity-in-negative "same as positive"`.
IDAdapter: the references go through the nodes' own face analysis (detect, align, ArcFace + CLIP, filled up to N),
MFF and the identity MLP, and the identity token is spliced. Inv-Adapter: the first reference photo with a face,
resized and centre-cropped as fit prepares its images, is the reference image. The score of an image is the Face
Similarity node's measure (`idadapter_core.face.identity_similarity`): the ArcFace cosine of its largest face to the
identity's mean reference face, or "no face" when none is found; the paper's ID-Sim (DESIGN.md §2.8).

Written to --out, each file atomically: similarity.csv and similarity.md (identity, prompt, seed, similarity, image;
the means), summary.json, grid.png (per identity and seed: reference crops (Inv-Adapter: the reference image) | one
generation per prompt; the first --grid-identities identities) and images/<identity>/prompt<NN>-seed<seed>.png.
Beside each identity's mean, `reference_similarity` is what its own photos score against each other (each reference
face against the mean of the others): the level a generation that looks like one more photo of the person would
reach (our addition, for reading the numbers).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from idadapter_core import DiffusersIDAdapter, IDAdapter, clip_encoder_from_transformers, load_idadapter
from idadapter_core.hosts import DiffusersInvAdapter
from idadapter_core.idadapter.files import IDADAPTER_FORMAT
from idadapter_core.inv_adapter import InvAdapter, load_inv_adapter
from idadapter_core.schedule import NEGATIVE_IDENTITY_MODES
from idadapter_core.errors import IDAdapterError, NoFaceError
from idadapter_core.face import (
    FILL_MODES, PROVIDERS, FaceAnalyzer, extract_face_features, face_embeddings, identity_similarity,
    load_face_analyzer, load_image,
)
from idadapter_core.weights import atomic_write

from .adapter_files import adapter_format
from .config import FitConfig
from .generate import (
    DEFAULT_REFERENCE_TIMESTEP, SAMPLING_REFERENCE_FEATURES, SamplingSettings, generate_identity_images,
    generate_inv_adapter_images, image_grid, inv_adapter_reference,
)
from .models import BaseModel, ClipVision, TextConditioning, load_base_model, load_clip_vision
from .prepare import IMAGE_EXTENSIONS, collect_images

log = logging.getLogger(__name__)

NO_FACE = "no face"
TABLE_CSV, TABLE_MD, SUMMARY_JSON, GRID_PNG, IMAGES_DIR = "similarity.csv", "similarity.md", "summary.json", "grid.png", "images"
MAX_GRID_TILE = 256
"""Grid tiles are at most this many pixels wide (our choice: a 512 or 1024 px tile per image makes huge grids)."""
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class EvalError(IDAdapterError):
    """The evaluation's inputs cannot be used (no references, no prompts, models that do not fit the weights)."""


# ---------------------------------------------------------------------------------------------------- the inputs


def is_image_file(path: Path) -> bool:
    """An image file `prepare` reads (by extension; hidden files are not)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def collect_references(source: str | Path) -> dict[str, list[Path]]:
    """Reference images per identity: a folder of identity subfolders, a folder of images (one identity, named after
    the folder) or a JSONL manifest ({"image", "identity"} per line, as `prepare` reads)."""
    source = Path(source)
    if source.is_dir():
        subfolders = [p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not any(is_image_file(f) for folder in subfolders for f in folder.iterdir()):
            files = sorted(p for p in source.iterdir() if is_image_file(p))
            if not files:
                raise EvalError(f"no reference images in {source}: give a folder with one subfolder of photos per "
                                f"identity, a folder of one person's photos ({', '.join(IMAGE_EXTENSIONS)}), or a "
                                "JSONL manifest")
            return {source.name: files}
    elif not source.is_file():
        raise EvalError(f"--references {source} does not exist; give a folder of reference photos or a JSONL manifest")
    identities: dict[str, list[Path]] = {}
    for image in collect_images(source):
        identities.setdefault(image.identity, []).append(image.path)
    return identities


def read_prompts(prompt_file: str | Path | None = None, prompts: Sequence[str] = ()) -> list[str]:
    """The prompts of a text file (one per line; blank lines and lines starting with '#' are skipped), then
    `prompts`."""
    found = []
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise EvalError(f"--prompts {path} is not a file; give a text file with one prompt per line")
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        found += [line for line in lines if line and not line.startswith("#")]
    found += [p.strip() for p in prompts if p.strip()]
    if not found:
        raise EvalError("no prompts: give --prompts FILE (one prompt per line) or --prompt TEXT (repeatable); the "
                        "identity suffix ', <class word> is <trigger word>' is appended to each")
    return found


# ---------------------------------------------------------------------------------------------------- the models


@dataclass
class EvalModels:
    """The weights and the frozen models they are evaluated with, on one device in one dtype."""

    adapter: IDAdapter | InvAdapter
    base: BaseModel
    clip: ClipVision | None
    """None for Inv-Adapter (it has no image encoder)."""
    analyzer: FaceAnalyzer
    weights: Path
    device: torch.device
    dtype: torch.dtype

    @property
    def default_resolution(self) -> int:
        """The base model's native image size: its UNet's sample size times the VAE's downscaling."""
        vae_scale = 2 ** (len(self.base.vae.config.block_out_channels) - 1)
        return int(self.base.unet.config.sample_size) * vae_scale


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto': CUDA when there is one, else the CPU; fp16 on a GPU, fp32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if dtype == "auto":
        return chosen, torch.float32 if chosen.type == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise EvalError(f"dtype must be auto or one of {', '.join(DTYPES)}, got '{dtype}'")
    return chosen, DTYPES[dtype]


def load_eval_models(
    weights: str | Path, clip_vision: str | Path | None, insightface_root: str | Path, *, pretrained: str | None = None,
    single_file: str | None = None, config_folder: str | None = None, original_config: str | None = None,
    face_model: str | None = None, provider: str = "CPU", det_size: int = 640, device: str = "auto",
    dtype: str = "auto",
) -> EvalModels:
    """Load the weights (either method's, by the file's format) against the base model (refused, naming both, when
    they were trained for another UNet), the CLIP vision model (IDAdapter only) and the face model, each checked
    against what the weights were trained with."""
    if bool(pretrained) == bool(single_file):
        raise EvalError("give the base model either as --pretrained (a diffusers folder) or as --single-file (with "
                        "--config-folder), not both or neither")
    weights = Path(weights)
    if not weights.is_file():
        raise EvalError(f"weights file {weights} not found; give an exported IDAdapter or Inv-Adapter .safetensors "
                        "(`python -m train export`)")
    is_idadapter = adapter_format(weights) == IDADAPTER_FORMAT
    if is_idadapter and not clip_vision:
        raise EvalError(f"{weights.name} holds IDAdapter weights, which need the CLIP vision model they were trained "
                        "with: pass --clip-vision")
    if not is_idadapter and not face_model:
        raise EvalError(f"{weights.name} holds Inv-Adapter weights, which name no face model; pass --face-model, the "
                        "insightface pack under --insightface-root that scores the images (e.g. antelopev2)")
    torch_device, torch_dtype = resolve_device(device, dtype)
    base = load_base_model(FitConfig(pretrained=pretrained, single_file=single_file, config_folder=config_folder,
                                     original_config=original_config))
    if is_idadapter:
        adapter = load_idadapter(weights, model_layout=base.layout, require_known_base=False)
        clip = _check_idadapter_encoders(adapter, base, weights, clip_vision)
    else:
        adapter, clip = load_inv_adapter(weights, model_layout=base.layout, require_known_base=False), None
        if clip_vision:
            log.info("--clip-vision is not used: Inv-Adapter has no image encoder")
    if adapter.config.layout.prediction != base.layout.prediction:
        log.warning("%s was trained on a %s model, but %s predicts %s; the images will be off", weights.name,
                    adapter.config.layout.prediction, base.name, base.layout.prediction)
    analyzer = load_face_analyzer(insightface_root, face_model or adapter.config.face_model, provider, det_size)
    if is_idadapter:
        _check_face_model(adapter, analyzer, weights)
    modules = [base.unet, base.vae, *base.text.modules(), *([] if clip is None else [clip.model])]
    for module in modules:
        module.to(torch_device)
        if torch_dtype != torch.float32:  # (they load in float32; diffusers warns at every cast)
            module.to(torch_dtype)
    adapter.to(torch_device, torch_dtype).eval()  # (exported weights are usually fp16)
    log.info("evaluating %s on %s (%s) with %s%s, on %s in %s", weights.name, base.name, base.layout.describe(),
             "" if clip is None else f"{clip.name}, ", analyzer.name, torch_device,
             str(torch_dtype).removeprefix("torch."))
    return EvalModels(adapter, base, clip, analyzer, weights, torch_device, torch_dtype)


def _check_idadapter_encoders(adapter: IDAdapter, base: BaseModel, weights: Path, clip_vision: str | Path) -> ClipVision:
    """The CLIP vision model, refused when it is not the one the weights were trained with; the weights' trigger word
    for the text conditioning."""
    config = adapter.config
    if config.trigger_word != base.text.trigger_word:  # E_c replaces the weights' own trigger word
        base.text = TextConditioning(base.text.encoders, config.trigger_word, sdxl=base.text.sdxl)
    clip = load_clip_vision(clip_vision)
    mff = config.mff
    found = (clip.num_patches, clip.patch_width, clip.embed_dim)
    if found != (mff.num_patches, mff.clip_dim, config.clip_embed_dim):
        raise EvalError(
            f"{weights.name} was trained with CLIP vision '{config.clip_vision}' ({mff.num_patches} patches x "
            f"{mff.clip_dim}, image embeds {config.clip_embed_dim}), but {clip_vision} gives {found[0]} x {found[1]}, "
            f"embeds {found[2]}; pass the CLIP vision folder the weights were trained with"
        )
    return clip


def _check_face_model(adapter: IDAdapter, analyzer: FaceAnalyzer, weights: Path) -> None:
    config = adapter.config
    if analyzer.embed_dim != config.mff.face_dim:
        raise EvalError(
            f"{weights.name} was trained with face model '{config.face_model}' ({config.mff.face_dim}-d embeddings), "
            f"but '{analyzer.name}' gives {analyzer.embed_dim}-d ones; pass --face-model {config.face_model}"
        )
    if analyzer.name != config.face_model:
        log.warning("%s was trained with face model '%s'; evaluating with '%s' (same embedding width, but another "
                    "embedding space: E_r and E_c will be off)", weights.name, config.face_model, analyzer.name)


# ---------------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class EvalRow:
    identity: str
    prompt: str
    seed: int
    similarity: float | None
    """None: no face found in the generated image."""
    image: str
    """The generated image, relative to the output folder."""


@dataclass
class EvalResult:
    out: Path
    rows: list[EvalRow] = field(default_factory=list)
    reference_similarity: dict[str, float | None] = field(default_factory=dict)
    """Per identity evaluated: its references' mean leave-one-out similarity (None with one reference face)."""
    references_used: dict[str, int] = field(default_factory=dict)
    """Per identity evaluated: the reference photos whose faces went into E_r (at most N)."""
    skipped_identities: dict[str, str] = field(default_factory=dict)
    """Identities with no usable reference face, with the reason."""

    @staticmethod
    def mean(rows: Sequence[EvalRow]) -> float | None:
        scores = [row.similarity for row in rows if row.similarity is not None]
        return float(np.mean(scores)) if scores else None

    @property
    def mean_similarity(self) -> float | None:
        """Mean over the generated images with a face (None when no image shows one)."""
        return self.mean(self.rows)

    def identity_rows(self, identity: str) -> list[EvalRow]:
        return [row for row in self.rows if row.identity == identity]

    def summary(self) -> dict:
        return {
            "mean_similarity": self.mean_similarity,
            "images": len(self.rows),
            "images_with_face": sum(row.similarity is not None for row in self.rows),
            "identities": {
                name: {
                    "mean_similarity": self.mean(self.identity_rows(name)),
                    "images": len(self.identity_rows(name)),
                    "images_with_face": sum(row.similarity is not None for row in self.identity_rows(name)),
                    "references_used": self.references_used[name],
                    "reference_similarity": self.reference_similarity[name],
                }
                for name in self.references_used
            },
            "skipped_identities": self.skipped_identities,
        }


def leave_one_out_similarity(embeddings: Sequence[np.ndarray]) -> float | None:
    """Mean cosine of each (L2-normalised) embedding to the normalised mean of the others; None for fewer than 2."""
    if len(embeddings) < 2:
        return None
    stacked = np.stack(embeddings)
    scores = []
    for i in range(len(stacked)):
        others = np.delete(stacked, i, axis=0).mean(axis=0)
        scores.append(float(stacked[i] @ (others / max(float(np.linalg.norm(others)), 1e-12))))
    return float(np.mean(scores))


def _format_similarity(value: float | None) -> str:
    return NO_FACE if value is None else f"{value:.4f}"


def _image_path(identity: str, prompt_index: int, seed: int) -> str:
    """Where a generation goes, relative to the output folder; the identity (a folder name, or any string in a
    manifest) is made a safe folder name."""
    folder = re.sub(r"[^\w.-]", "_", identity).lstrip(".") or "_"
    return f"{IMAGES_DIR}/{folder}/prompt{prompt_index:02d}-seed{seed}.png"


def _save_png(path: Path, pixels: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def _load_references(identity: str, paths: list[Path]) -> tuple[list[np.ndarray], list[Path]]:
    """The readable reference images and their paths."""
    images, loaded = [], []
    for path in paths:
        try:
            images.append(load_image(path))
            loaded.append(path)
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... for unreadable files
            log.warning("%s: skipping the unreadable reference %s (%s: %s)", identity, path, type(err).__name__, err)
    return images, loaded


@dataclass
class _Conditioning:
    """One identity as the method sees it: how to generate from it, and what the grid shows of its references."""

    generate: Callable[[list[str], list[int]], np.ndarray]
    """(prompts, seeds) -> (len(prompts), H, W, 3) uint8."""
    shown: list[np.ndarray]
    """The reference images the method used (IDAdapter: the aligned crops of its N; Inv-Adapter: its one image)."""


@dataclass(frozen=True)
class InvAdapterSettings:
    """How Inv-Adapter takes its reference at each step (`generate_inv_adapter_images`)."""

    reference_features: str = "inversion"
    inversion_steps: int = 50
    reference_timestep: int = DEFAULT_REFERENCE_TIMESTEP

    def __post_init__(self) -> None:
        if self.reference_features not in SAMPLING_REFERENCE_FEATURES:
            raise EvalError(f"reference features must be one of {', '.join(SAMPLING_REFERENCE_FEATURES)}, got "
                            f"'{self.reference_features}'")
        if self.inversion_steps < 1 or self.reference_timestep < 0:
            raise EvalError(f"inversion steps must be at least 1 and the reference timestep at least 0, got "
                            f"{self.inversion_steps} and {self.reference_timestep}")


def evaluate(
    models: EvalModels, references: dict[str, list[Path]], prompts: Sequence[str], out: str | Path,
    settings: SamplingSettings, seeds: Sequence[int] = (0,), *, weight: float = 1.0, class_word: str | None = None,
    num_refs: int | None = None, fill_mode: str = "replicate", min_face_size: int = 64, batch_size: int = 4,
    grid_identities: int = 16, inv_adapter: InvAdapterSettings = InvAdapterSettings(),
) -> EvalResult:
    """Generate every (identity, prompt, seed), score it, and write the table, the grid and the images to `out`.
    IDAdapter: `num_refs` (default: the weights' N) and `fill_mode` are Extract Face Features' settings, `class_word`
    (default: the weights') that of the identity suffix; Inv-Adapter: `inv_adapter`. The grid shows the first
    `grid_identities` identities evaluated (our choice: a grid of hundreds of people is unreadable)."""
    if not references:
        raise EvalError("no reference identities to evaluate")
    if batch_size < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}")
    out = Path(out)
    adapter, base = models.adapter, models.base
    is_idadapter = isinstance(adapter, IDAdapter)
    if is_idadapter:
        class_word = class_word or adapter.config.class_word
        binding = DiffusersIDAdapter(base.unet, adapter, weight=weight)
        encoder = clip_encoder_from_transformers(models.clip.model)
    else:
        class_word = None
        binding = DiffusersInvAdapter(base.unet, adapter, weight=weight)
    seeds = list(dict.fromkeys(int(seed) for seed in seeds))
    jobs = [(index, prompt, seed) for seed in seeds for index, prompt in enumerate(prompts)]
    result = EvalResult(out)
    tile = min(settings.resolution, MAX_GRID_TILE)
    grid_rows: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
    progress = tqdm(total=len(references) * len(jobs), desc="eval", unit="image")
    with logging_redirect_tqdm(), progress, binding:
        for identity, paths in references.items():
            images, loaded = _load_references(identity, paths)
            try:
                if not images:
                    raise NoFaceError(f"none of its {len(paths)} reference image(s) could be read")
                if is_idadapter:
                    conditioning = _idadapter_conditioning(models, binding, images, loaded, encoder, settings,
                                                           class_word, num_refs or adapter.config.num_refs, fill_mode,
                                                           min_face_size)
                else:
                    conditioning = _inv_adapter_conditioning(models, binding, images, loaded, settings, inv_adapter)
            except NoFaceError as err:
                log.warning("skipping identity %s: %s", identity, err)
                result.skipped_identities[identity] = str(err)
                progress.update(len(jobs))
                continue
            generated: list[np.ndarray] = []
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                generated += list(conditioning.generate([prompt for _, prompt, _ in chunk],
                                                        [seed for _, _, seed in chunk]))
                progress.update(len(chunk))
            scores = identity_similarity(models.analyzer, images, generated).scores
            reference_faces = [e for e in face_embeddings(models.analyzer, images) if e is not None]
            result.reference_similarity[identity] = leave_one_out_similarity(reference_faces)
            result.references_used[identity] = len(conditioning.shown)
            for (index, prompt, seed), pixels, score in zip(jobs, generated, scores):
                relative = _image_path(identity, index, seed)
                _save_png(out / relative, pixels)
                result.rows.append(EvalRow(identity, prompt, seed, score, relative))
            if len(result.references_used) <= grid_identities:
                crops = [_tile(image, tile) for image in conditioning.shown]
                for seed in seeds:
                    grid_rows.append((crops, [_tile(pixels, tile) for (_, _, s), pixels in zip(jobs, generated)
                                              if s == seed]))
    if not result.rows:
        raise EvalError("no identity has a usable reference face: " + "; ".join(
            f"{name}: {reason}" for name, reason in result.skipped_identities.items()))
    method = {"weight": weight, "class_word": class_word} if is_idadapter else {"weight": weight, **asdict(inv_adapter)}
    _write_outputs(result, grid_rows, tile, models, settings, prompts, seeds, method)
    return result


def _idadapter_conditioning(models: EvalModels, binding: DiffusersIDAdapter, images: list[np.ndarray],
                            paths: list[Path], encoder, settings: SamplingSettings, class_word: str, num_refs: int,
                            fill_mode: str, min_face_size: int) -> _Conditioning:
    """E_r and E_c from the identity's references as Extract Face Features makes them (NoFaceError: none usable)."""
    features, aligned = extract_face_features(
        models.analyzer, images, encoder, num_refs=num_refs, fill_mode=fill_mode, min_face_size=min_face_size,
        image_names=[path.name for path in paths],
    )
    feats = {name: getattr(features, name)[None].to(models.device, models.dtype)
             for name in ("clip_patches", "face_embeds", "clip_image_embeds")}

    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return generate_identity_images(models.base, models.adapter, binding, feats, prompts, class_word, seeds,
                                        settings)

    return _Conditioning(generate, [reference.clip_crop for reference in aligned[:len(features.source_indices)]])


def _inv_adapter_conditioning(models: EvalModels, binding: DiffusersInvAdapter, images: list[np.ndarray],
                              paths: list[Path], settings: SamplingSettings,
                              inv_adapter: InvAdapterSettings) -> _Conditioning:
    """The identity's first reference photo with a face, as fit prepares its images (NoFaceError: none has one)."""
    faces = face_embeddings(models.analyzer, images)
    first = next((i for i, face in enumerate(faces) if face is not None), None)
    if first is None:
        raise NoFaceError(f"no face found in any of its {len(images)} reference image(s)")
    shown, latent = inv_adapter_reference(models.base, paths[first], settings.resolution)
    latent = latent.to(models.device, models.dtype)

    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return generate_inv_adapter_images(
            models.base, models.adapter, binding, latent, prompts, seeds, settings, inv_adapter.reference_features,
            inv_adapter.inversion_steps, inv_adapter.reference_timestep)

    return _Conditioning(generate, [shown])


def _tile(image: np.ndarray, size: int) -> np.ndarray:
    """A grid tile of an RGB uint8 image, resized now so the grid's images are not all kept at full size."""
    return image_grid([[image]], size)


def _write_outputs(result: EvalResult, grid_rows, tile: int, models: EvalModels, settings: SamplingSettings,
                   prompts: Sequence[str], seeds: Sequence[int], method_settings: dict) -> None:
    out = result.out
    header = ["identity", "prompt", "seed", "similarity", "image"]
    table = [[row.identity, row.prompt, str(row.seed), _format_similarity(row.similarity), row.image]
             for row in result.rows]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(table)
    text = buffer.getvalue()
    atomic_write(out / TABLE_CSV, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    summary = result.summary()
    lines = [f"# ID similarity of {models.weights.name}", "",
             "ArcFace cosine of each generated face to the identity's mean reference face (the Face Similarity "
             f"node's measure; '{NO_FACE}': none found).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
    lines += ["", f"**Mean: {_format_similarity(summary['mean_similarity'])}** over {summary['images_with_face']} of "
                  f"{summary['images']} images with a face.", "",
              "| identity | mean | images with a face | references used | references' own similarity |",
              "|---|---|---|---|---|"]
    for name, entry in summary["identities"].items():
        own = entry["reference_similarity"]
        lines.append(f"| {name} | {_format_similarity(entry['mean_similarity'])} | {entry['images_with_face']} of "
                     f"{entry['images']} | {entry['references_used']} | {'-' if own is None else f'{own:.4f}'} |")
    for name, reason in result.skipped_identities.items():
        lines.append(f"\nSkipped {name}: {reason}")
    markdown = "\n".join(lines) + "\n"
    atomic_write(out / TABLE_MD, lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))

    summary["weights"] = str(models.weights)
    summary["base"] = models.base.name
    summary["method"] = "IDAdapter" if isinstance(models.adapter, IDAdapter) else "Inv-Adapter"
    summary["settings"] = {"prompts": list(prompts), "seeds": [int(s) for s in seeds], **method_settings,
                           **asdict(settings)}
    payload = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / SUMMARY_JSON, lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))

    most_references = max(len(crops) for crops, _ in grid_rows)
    blank = np.full((tile, tile, 3), 255, np.uint8)
    rows = [[*crops, *[blank] * (most_references - len(crops)), *generations] for crops, generations in grid_rows]
    _save_png(out / GRID_PNG, image_grid(rows, tile))
    log.info("ID similarity: mean %s over %d of %d images with a face; table %s, grid %s",
             _format_similarity(summary["mean_similarity"]), summary["images_with_face"], summary["images"],
             out / TABLE_MD, out / GRID_PNG)


# ---------------------------------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="an exported IDAdapter or Inv-Adapter .safetensors file")
    models = parser.add_argument_group("models (local files only, never downloaded)")
    models.add_argument("--pretrained", help="the base model, a diffusers folder (SD1.5, SD2.1, SDXL)")
    models.add_argument("--single-file", help="the base model as a single-file checkpoint, instead of --pretrained")
    models.add_argument("--config-folder", help="with --single-file: a local diffusers folder of the same model type")
    models.add_argument("--original-config", help="with --single-file: the original LDM .yaml config, if needed")
    models.add_argument("--clip-vision", help="a transformers CLIPVisionModelWithProjection folder (IDAdapter weights)")
    models.add_argument("--insightface-root", required=True, help="folder holding models/<face-model>/*.onnx")
    models.add_argument("--face-model", help="insightface model pack name (default: the one IDAdapter weights name; "
                                             "required for Inv-Adapter weights)")
    models.add_argument("--det-size", type=int, default=640, help="face detection size (default 640)")
    models.add_argument("--provider", default="CPU", choices=list(PROVIDERS), help="onnxruntime provider")
    models.add_argument("--device", default="auto", help="torch device (default: cuda if there is one, else cpu)")
    models.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype of the models (default: fp16 on a GPU, fp32 on the CPU)")
    data = parser.add_argument_group("what to generate")
    data.add_argument("--references", type=Path, required=True,
                      help="reference photos: one subfolder per identity, a folder of one person's photos, or a JSONL "
                           "manifest")
    data.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    data.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; after those of --prompts)")
    data.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per prompt and seed (default 0)")
    data.add_argument("--class-word", help="class word of the identity suffix (default: the weights')")
    data.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    data.add_argument("--out", type=Path, required=True, help="output folder for the table, grid and images")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30)")
    sampling.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    sampling.add_argument("--resolution", type=int, help="image size (default: the base model's native size)")
    sampling.add_argument("--identity-in-negative", default=NEGATIVE_IDENTITY_MODES[0],
                          choices=list(NEGATIVE_IDENTITY_MODES),
                          help="what the negative half of classifier-free guidance gets: the null identity, so the "
                               f"guidance scale scales the identity too, or the identity (default "
                               f"'{NEGATIVE_IDENTITY_MODES[0]}')")
    sampling.add_argument("--weight", type=float, default=1.0, help="adapter weight β (default 1)")
    sampling.add_argument("--batch-size", type=int, default=4, help="images generated at once (default 4)")
    sampling.add_argument("--grid-identities", type=int, default=16,
                          help="identities shown in grid.png, the first ones (default 16)")
    inv = parser.add_argument_group("Inv-Adapter's reference at each step (Inv-Adapter weights)")
    inv.add_argument("--reference-features", default="inversion", choices=list(SAMPLING_REFERENCE_FEATURES),
                     help="the point of the reference's DDIM inversion nearest to each step's noise level, the "
                          "reference forward-noised to each step's timestep, or forward-noised to one fixed timestep "
                          "(default inversion: as Apply Inv-Adapter does it and fit trains by default)")
    inv.add_argument("--inversion-steps", type=int, default=50, help="DDIM inversion steps (default 50)")
    inv.add_argument("--reference-timestep", type=int, default=DEFAULT_REFERENCE_TIMESTEP,
                     help=f"the timestep of --reference-features fixed (default {DEFAULT_REFERENCE_TIMESTEP})")
    faces = parser.add_argument_group("reference faces (as Extract Face Features; IDAdapter weights)")
    faces.add_argument("--num-refs", type=int, help="N references per identity (default: the weights' N)")
    faces.add_argument("--fill-mode", default="replicate", choices=list(FILL_MODES),
                       help="how fewer photos than N are filled up (default replicate, the paper's inference)")
    faces.add_argument("--min-face-size", type=int, default=64, help="smallest usable face, in pixels (default 64)")


def run(args: argparse.Namespace) -> EvalResult:
    references = collect_references(args.references)
    prompts = read_prompts(args.prompts, args.prompt)
    models = load_eval_models(
        args.weights, args.clip_vision, args.insightface_root, pretrained=args.pretrained, single_file=args.single_file,
        config_folder=args.config_folder, original_config=args.original_config, face_model=args.face_model,
        provider=args.provider, det_size=args.det_size, device=args.device, dtype=args.dtype,
    )
    settings = SamplingSettings(args.resolution or models.default_resolution, args.steps, args.guidance,
                                args.negative_prompt, args.identity_in_negative)
    return evaluate(models, references, prompts, args.out, settings, args.seeds, weight=args.weight,
                    class_word=args.class_word, num_refs=args.num_refs, fill_mode=args.fill_mode,
                    min_face_size=args.min_face_size, batch_size=args.batch_size,
                    grid_identities=args.grid_identities,
                    inv_adapter=InvAdapterSettings(args.reference_features, args.inversion_steps,
                                                   args.reference_timestep))
