"""A miniature world in which identity can be seen: synthetic 32 px "people" whose identity is a few large coloured
attributes, a deterministic read-out of those attributes from any image, and a tiny SD-like base model that learns to
draw any combination of them, with a CLIP vision model that names them and a face recognizer that tells them apart
(each trained once per settings and seed, and cached). Used by bench/identity_generation.py.

The face. A 16 px square (what the tiny insightface pack of train/tiny_face_models.py detects with its `colour`
measure: every pixel of the square strongly coloured, the surround grey) near the centre of the photo:

    rows 0-3    hair (hair colour), the whole width
    rows 4-7    eyes (eye colour, 4 x 4 px each, cols 4-7 and 8-11) between the sides
    rows 4-15   sides (cols 0-3 and 12-15): hair colour for long hair, skin colour for short ('buzz') hair
    rows 8-15   skin (skin colour) between the sides

Identity = (skin, hair, eyes, hair length): 4 x 4 x 4 x 2 = 128 people; the colours are saturated and far apart from
each other and from the grey backgrounds. Chance of the read-out is (3 x 1/4 + 1/2) / 4 = 0.31. What a photo varies
beside identity: the background's grey level and tint, the brightness (x 0.92..1.08) and the face's position
(centred, or 4 px off along one axis).

The read-out finds the face (of the possible positions, the one whose square is most strongly coloured against its
surround) and reads each attribute from the middle of its region: the median colour, nearest value of that
attribute's palette; hair length is long where the sides are nearer the read hair colour than the read skin colour.
An image is well formed when every region is within `WELL_FORMED_DISTANCE` of a palette value
(sides: of the read hair or skin colour) and the background is grey. On rendered photos it is exact (tests).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from idadapter_core.face import FaceAnalyzer, arcface_crop, load_face_analyzer
from idadapter_core.hosts.transformers_clip import comfy_clip_preprocess

from .cache import TrainCache
from .prepare import prepare_dataset
from .pretrain import train_autoencoder, train_clip_vision, train_recognizer, train_unet
from .tiny_face_models import TinyRecognizer, export_recognizer_model, write_model_pack
from .tiny_models import (
    TINY_SPEC, WORDS, BaseComponents, ModelSpec, build_base_components, build_clip_vision, save_base_model,
    text_encoder, tiny_clip_tokenizer,
)

log = logging.getLogger(__name__)

PHOTO_SIZE = 32
FACE_SIDE = 16
FACE_ORIGIN = (PHOTO_SIZE - FACE_SIDE) // 2
DET_SIZE = 64
"""Photos are scaled 2x for detection, where the 16 px face is the tiny detector's stride-8 square."""
CLASS_WORD = "person"
CAPTION = "a photo of a person"
"""The plain caption: no attribute named (the adapters train with it; the base with it for some photos)."""

ATTRIBUTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "skin": {"orange": (245, 120, 40), "pink": (240, 130, 195), "brown": (150, 85, 35), "yellow": (230, 225, 60)},
    "hair": {"red": (215, 20, 60), "jade": (40, 165, 60), "blue": (45, 75, 225), "purple": (135, 40, 175)},
    "eyes": {"cyan": (30, 205, 215), "lime": (165, 235, 40), "magenta": (225, 40, 205), "navy": (25, 35, 145)},
    "length": {"buzz": (0, 0, 0), "long": (0, 0, 0)},
}
"""Each attribute's values (the colour is unused for length: the sides take the hair or the skin colour). Each value
is one token of the base's tokenizer (so 'jade' and 'buzz': its byte-pair merges split 'green' and 'short')."""
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
VOCABULARY = ("with", "skin", "hair", "eyes", *(word for values in ATTRIBUTES.values() for word in values))
"""Caption words that are single tokens of the base's tokenizer (beside train/tiny_models.WORDS)."""
CHANCE = float(np.mean([1 / len(values) for values in ATTRIBUTES.values()]))
WELL_FORMED_DISTANCE = 60.0
"""Largest RGB distance of a read region from the colour it is read as, in a well-formed image (values of one
attribute are at least 95 apart, skin from hair too)."""
GREY_CHROMA = 45
"""Largest max - min channel of a well-formed image's background (the backgrounds are grey)."""

Identity = tuple[int, ...]
"""The index of each attribute's value, in ATTRIBUTE_NAMES order."""


def all_identities() -> list[Identity]:
    return list(itertools.product(*(range(len(values)) for values in ATTRIBUTES.values())))


def identity_name(identity: Identity) -> str:
    return "-".join(list(ATTRIBUTES[name])[value] for name, value in zip(ATTRIBUTE_NAMES, identity))


def attribute_caption(identity: Identity) -> str:
    """'a photo of a person with orange skin red long hair cyan eyes' (13 tokens of the base's tokenizer)."""
    skin, hair, eyes, length = (list(ATTRIBUTES[name])[value] for name, value in zip(ATTRIBUTE_NAMES, identity))
    return f"{CAPTION} with {skin} skin {hair} {length} hair {eyes} eyes"


def colour(attribute: str, value: int) -> np.ndarray:
    return np.array(list(ATTRIBUTES[attribute].values())[value], np.float32)


# ---- rendering ---------------------------------------------------------------------------------------------------

SHIFT = 4
SHIFTS = ((0, 0), (SHIFT, 0), (-SHIFT, 0), (0, SHIFT), (0, -SHIFT))
"""Where the face may be: centred, or one latent cell (4 px) off along one axis. Every region stays on the 4 px grid of
the 8x8 latents (a flat colour per latent cell is what the tiny VAE reconstructs well) and on the tiny detector's
anchors (its stride 8 at the 2x detection size)."""


@dataclass(frozen=True)
class PhotoVariation:
    """What a photo varies beside identity."""

    background: tuple[float, float, float]
    brightness: float
    shift: tuple[int, int]
    """(dx, dy) of the face, in pixels."""

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "PhotoVariation":
        grey = rng.uniform(70, 190)
        background = tuple(float(v) for v in grey + rng.normal(0, 5, 3))
        shift = SHIFTS[int(rng.integers(len(SHIFTS)))]
        return cls(background, float(rng.uniform(0.92, 1.08)), shift)


def face_pixels(identity: Identity) -> np.ndarray:
    """(16, 16, 3) float32: the face square (module docstring)."""
    skin, hair, eyes = (colour(name, identity[i]) for i, name in enumerate(ATTRIBUTE_NAMES[:3]))
    long_hair = identity[3] == 1
    face = np.empty((FACE_SIDE, FACE_SIDE, 3), np.float32)
    face[:] = skin
    face[:4] = hair
    if long_hair:
        face[4:, :4] = hair
        face[4:, 12:] = hair
    face[4:8, 4:8] = eyes
    face[4:8, 8:12] = eyes
    return face


def render_photo(identity: Identity, variation: PhotoVariation) -> np.ndarray:
    """(32, 32, 3) uint8."""
    image = np.empty((PHOTO_SIZE, PHOTO_SIZE, 3), np.float32)
    image[:] = variation.background
    x0, y0 = FACE_ORIGIN + variation.shift[0], FACE_ORIGIN + variation.shift[1]
    image[y0:y0 + FACE_SIDE, x0:x0 + FACE_SIDE] = face_pixels(identity)
    return np.clip(image * variation.brightness, 0, 255).round().astype(np.uint8)


def write_photos(identities: list[Identity], per_identity: int, folder: Path, rng: np.random.Generator,
                 captions: bool = False) -> dict[Identity, list[Path]]:
    """folder/<identity name>/<i>.png, as `prepare` reads a data set (with `captions`, a same-name .txt naming the
    attributes). The folder is emptied first: `prepare` reads every person's folder in it, so a reused workdir's
    people from an earlier call (another `train_identities`) would join the data set unseen."""
    shutil.rmtree(folder, ignore_errors=True)
    written = {}
    for identity in identities:
        (folder / identity_name(identity)).mkdir(parents=True, exist_ok=True)
        written[identity] = []
        for index in range(per_identity):
            path = folder / identity_name(identity) / f"{index:03d}.png"
            Image.fromarray(render_photo(identity, PhotoVariation.draw(rng))).save(path)
            if captions:
                path.with_suffix(".txt").write_text(attribute_caption(identity), encoding="utf-8")
            written[identity].append(path)
    return written


# ---- the read-out ------------------------------------------------------------------------------------------------

def _region(image: np.ndarray, origin: tuple[int, int], rows: tuple[int, int],
            columns: list[tuple[int, int]]) -> np.ndarray:
    """Median colour of the face-relative rows x columns (each a half-open range) of the face at origin (x, y)."""
    x0, y0 = origin
    pixels = np.concatenate([image[y0 + rows[0]:y0 + rows[1], x0 + c0:x0 + c1].reshape(-1, 3) for c0, c1 in columns])
    return np.median(pixels.astype(np.float32), axis=0)


def _outside(origin: tuple[int, int], margin: int) -> np.ndarray:
    """(32, 32) bool: the pixels farther than `margin` from the face at origin (x, y)."""
    outside = np.ones((PHOTO_SIZE, PHOTO_SIZE), bool)
    x0, y0 = origin
    outside[max(y0 - margin, 0):y0 + FACE_SIDE + margin, max(x0 - margin, 0):x0 + FACE_SIDE + margin] = False
    return outside


def find_face(image: np.ndarray) -> tuple[int, int]:
    """The origin (x, y) of the face: of the positions a face may take (SHIFTS), the one whose square's mean chroma
    exceeds its surround's the most."""
    chroma = image.max(axis=2).astype(np.float32) - image.min(axis=2)

    def contrast(shift: tuple[int, int]) -> float:
        x0, y0 = FACE_ORIGIN + shift[0], FACE_ORIGIN + shift[1]
        return float(chroma[y0:y0 + FACE_SIDE, x0:x0 + FACE_SIDE].mean() - chroma[_outside((x0, y0), 0)].mean())

    best = max(SHIFTS, key=contrast)
    return FACE_ORIGIN + best[0], FACE_ORIGIN + best[1]


REGIONS = {
    "skin": ((9, 15), [(5, 11)]),
    "hair": ((1, 3), [(1, 15)]),
    "eyes": ((5, 7), [(5, 7), (9, 11)]),
    "sides": ((9, 15), [(1, 3), (13, 15)]),
}
"""Face-relative rows and columns each attribute is read from: its region less a 1 px border."""


@dataclass(frozen=True)
class Reading:
    values: Identity
    well_formed: bool
    background: float
    """Mean grey level outside the face (2 px margin): what the background-copy check compares."""


def read_image(image: np.ndarray) -> Reading:
    """The attributes an image (32, 32, 3) uint8 shows (module docstring)."""
    image = np.asarray(image)
    values, distances = [], []
    origin = find_face(image)
    regions = {name: _region(image, origin, *where) for name, where in REGIONS.items()}
    read_colours = {}
    for name in ("skin", "hair", "eyes"):
        palette = np.array(list(ATTRIBUTES[name].values()), np.float32)
        gaps = np.linalg.norm(palette - regions[name], axis=1)
        values.append(int(gaps.argmin()))
        distances.append(float(gaps.min()))
        read_colours[name] = palette[gaps.argmin()]
    to_hair = float(np.linalg.norm(regions["sides"] - read_colours["hair"]))
    to_skin = float(np.linalg.norm(regions["sides"] - read_colours["skin"]))
    values.append(int(to_hair < to_skin))
    distances.append(min(to_hair, to_skin))
    background = image[_outside(origin, 2)].astype(np.float32)
    chroma = float(np.median(background.max(axis=1) - background.min(axis=1)))
    well_formed = max(distances) <= WELL_FORMED_DISTANCE and chroma <= GREY_CHROMA
    return Reading(tuple(values), well_formed, float(background.mean()))


def attribute_accuracy(readings: list[Reading], identities: list[Identity]) -> np.ndarray:
    """(attributes,) share of readings that show their identity's value, per attribute."""
    hits = np.array([[r.values[i] == identity[i] for i in range(len(ATTRIBUTE_NAMES))]
                     for r, identity in zip(readings, identities)], np.float64)
    return hits.mean(axis=0)


# ---- the base model: autoencoder, then UNet on captioned photos; cached ----------------------------------------

@dataclass(frozen=True)
class BaseSettings:
    photos: int = 2048
    """Photos of random people (every value combination is as likely)."""
    captioned: float = 0.8
    """Share of them whose caption names the attributes (the rest: the plain caption)."""
    autoencoder_steps: int = 1200
    autoencoder_lr: float = 5e-3
    unet_steps: int = 3600
    """At 2400, seed 0's base, retrained on a second machine (2026-12-07), drew eye colours at 0.39 when told them
    (ceiling 0.848, under the bar's 0.85; on the first machine the three bases drew them at 0.99 on average): floats
    round differently across CPUs and training amplifies it. At 3600 the three ceilings read 1.000 / 1.000 / 0.996
    on the second machine."""
    batch_size: int = 32
    lr: float = 2e-3
    train_text_encoder: bool = True
    """The text encoder trains with the UNet. A random frozen one separates captions by seed: seed 0's moved its
    output 1.98 for another eye word against 5.29 and 2.98 for seeds 1 and 2 (L2 over the tokens, output norm 22.6),
    and its base never learned eye colours (told them, it drew them at 0.38; seeds 1 and 2 at 0.99 and 1.00)."""
    ema_decay: float = 0.999
    """The trained weights are the exponential moving average of their training weights (diffusers' EMAModel, with its
    warm-up): at 1200 steps, EMA raised the told-attributes accuracy from 0.56 to 0.60 and well-formed images from
    39 % to 45 % (seed 0, 64 images)."""

    def key(self, seed: int) -> str:
        """Of the settings, the seed and the world (its palettes)."""
        return cache_key(asdict(self), seed, ATTRIBUTES)


TRAINED_FILE = "trained.json"
"""Written last into a cached model's folder (base, CLIP vision model, face model pack): its training time, losses and
settings."""


def cache_key(*parts: object) -> str:
    """The name suffix of a cached model's folder: a hash of what it was trained from (JSON-serialisable parts)."""
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:12]


def model_spec() -> ModelSpec:
    """`TINY_SPEC` (32 px, 8x8 latents) with a narrower VAE without attention (it is trained here) and 2 channel
    groups in its norms (with one channel a group, GroupNorm would take each channel's own level out of the image,
    which is what a flat colour is), and a CLIP vision model of 4 px patches: 8x8 of them over the 32 px crop, so an
    eye spans about one patch, as the real ViT-H/14 (16x16 patches of 14 px over its 224 px crop) sees a face's
    features in patches of their own. With `TINY_SPEC`'s 8 px patches (4x4) each patch holding the eyes also held
    hair and skin, and IDAdapter drew the eyes in the hair colour in most of its malformed images (seed 1, 2026-12-06).
    The CLIP model is trained by `tiny_clip_vision`, on the base's text encoder, and cached beside the base."""
    return replace(TINY_SPEC, vae=dict(
        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4, norm_num_groups=2, layers_per_block=1, mid_block_add_attention=False,
    ), clip_vision=dict(TINY_SPEC.clip_vision, patch_size=4))


def build_base_parts(seed: int) -> BaseComponents:
    """Random-weight parts of `model_spec()` with a tokenizer that knows the attribute words. The VAE and the UNet
    are drawn as `build_base_components` draws them (after a text encoder of the default vocabulary), then the text
    encoder again from the seed for the larger vocabulary: the cached bases (keyed by settings and seed) stay valid."""
    spec = model_spec()
    parts = build_base_components(spec, seed)
    parts.tokenizer = tiny_clip_tokenizer(WORDS + VOCABULARY, max_length=spec.text_tokens)
    torch.manual_seed(seed)
    parts.text_encoder = text_encoder(parts.tokenizer, spec.text_tokens, **spec.text).eval()
    return parts


def photo_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, 32, 32) float in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tiny_base(settings: BaseSettings, seed: int, workdir: Path) -> Path:
    """The cached base model folder for these settings and seed (trained here the first time): photos of random
    people, most captioned with their attributes; the autoencoder, then the UNet."""
    folder = workdir / f"base-{settings.key(seed)}"
    if (folder / TRAINED_FILE).is_file():
        log.info("base model: cached %s", folder)
        return folder
    started = time.perf_counter()
    rng = np.random.default_rng([seed, 1])
    people = all_identities()
    chosen = [people[i] for i in rng.integers(0, len(people), settings.photos)]
    pixels = photo_tensor([render_photo(identity, PhotoVariation.draw(rng)) for identity in chosen])
    captions = [attribute_caption(identity) if rng.random() < settings.captioned else CAPTION for identity in chosen]
    parts = build_base_parts(seed)
    autoencoder_loss = train_autoencoder(parts.vae, pixels, settings.autoencoder_steps, settings.batch_size,
                                         settings.autoencoder_lr, seed)
    log.info("base model: autoencoder trained, reconstruction MSE %.5f (pixels in [-1, 1])", autoencoder_loss)
    unet_loss = float(np.mean(train_unet(parts, pixels, captions, settings.unet_steps, settings.batch_size,
                                         settings.lr, seed, ema_decay=settings.ema_decay,
                                         train_text_encoder=settings.train_text_encoder)[-50:]))
    log.info("base model: UNet trained, ε-MSE of the last 50 steps %.4f", unet_loss)
    save_base_model(parts, folder)
    record = dict(seconds=time.perf_counter() - started, autoencoder_mse=autoencoder_loss, unet_mse=unet_loss,
                  settings=asdict(settings), seed=seed)
    (folder / TRAINED_FILE).write_text(json.dumps(record))
    log.info("base model: trained in %.0f s, cached in %s", record["seconds"], folder)
    return folder


def training_record(folder: Path) -> dict:
    """The `TRAINED_FILE` of a cached model (`tiny_base`, `tiny_clip_vision`, `tiny_face_pack`)."""
    return json.loads((folder / TRAINED_FILE).read_text())


def round_trip(vae: torch.nn.Module, images: list[np.ndarray]) -> np.ndarray:
    """(B, 32, 32, 3) uint8: the images through the VAE's encoder (posterior mean) and decoder."""
    with torch.no_grad():
        decoded = vae.decode(vae.encode(photo_tensor(images)).latent_dist.mean).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


# ---- the CLIP vision model: contrastive, against the base's text encoder; cached -----------------------------------

@dataclass(frozen=True)
class ClipSettings:
    """A random CLIP vision model encodes the 32 px crops into features that say little about the attributes: with
    one, IDAdapter's identity token alone (E_r = 0) read 0.38 against the base's 0.33 (seed 1). Real CLIP is trained
    to name what it sees; so is this one, on every person of the world (as CLIP has seen faces like any of them). With
    it, IDAdapter (2400 steps, the 2026-12-06 bases) read 0.97 ± 0.06 against 0.85 ± 0.11, eye colour 0.98 against
    0.51; its share of well-formed images stayed 86 %."""
    photos_per_person: int = 8
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3

    def key(self, base_folder: Path, seed: int) -> str:
        """Of the settings, the seed and the base (whose text encoder the captions go through)."""
        return cache_key(asdict(self), seed, base_folder.name)


def tiny_clip_vision(settings: ClipSettings, base_folder: Path, analyzer: FaceAnalyzer, seed: int,
                     workdir: Path) -> Path:
    """The cached CLIP vision model folder (a transformers CLIPVisionModelWithProjection of `model_spec()`) for these
    settings, seed and base, trained here the first time: photos of every person go through the trainer's `prepare`
    (detection and alignment: the crops the adapters' CLIP sees), and the model learns to pick each crop's attribute
    caption among all 128 people's, the captions encoded by the base's trained text encoder (pooled), which stays as
    it is (`train.pretrain.train_clip_vision`)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = workdir / f"clip-{settings.key(base_folder, seed)}"
    if (folder / TRAINED_FILE).is_file():
        log.info("CLIP vision model: cached %s", folder)
        return folder
    started = time.perf_counter()
    people = all_identities()
    scratch = workdir / f"{folder.name}-data"
    write_photos(people, settings.photos_per_person, scratch / "photos", np.random.default_rng([seed, 5]))
    prepare_dataset(scratch / "photos", scratch / "cache", analyzer, min_face_size=8, min_images=1, augmentations=0,
                    overwrite=True)
    cache = TrainCache(scratch / "cache")
    index = {identity_name(person): number for number, person in enumerate(people)}
    rows, labels = [], []
    for name, records in cache.identities().items():
        rows += [record.row for record in records]
        labels += [index[name]] * len(records)
    crops = torch.stack([cache.clip_crop(row) for row in rows]).float() / 255.0
    model = build_clip_vision(model_spec().clip_vision, seed)
    pixels = comfy_clip_preprocess(crops, int(model.config.image_size), torch.tensor(OPENAI_CLIP_MEAN),
                                   torch.tensor(OPENAI_CLIP_STD))
    tokenizer = CLIPTokenizer.from_pretrained(base_folder / "tokenizer")
    text = CLIPTextModel.from_pretrained(base_folder / "text_encoder").eval()
    with torch.no_grad():
        tokens = tokenizer([attribute_caption(person) for person in people], padding="max_length",
                           max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        caption_embeds = text(**tokens).pooler_output
    loss = train_clip_vision(model, pixels, torch.tensor(labels), caption_embeds, settings.steps, settings.batch_size,
                             settings.lr, seed)
    model.save_pretrained(folder)
    shutil.rmtree(scratch)
    record = dict(seconds=time.perf_counter() - started, contrastive_loss=loss, crops=len(rows),
                  settings=asdict(settings), seed=seed, base=base_folder.name)
    (folder / TRAINED_FILE).write_text(json.dumps(record))
    log.info("CLIP vision model: trained in %.0f s (contrastive loss %.3f), cached in %s", record["seconds"], loss,
             folder)
    return folder


# ---- the face model pack: the colour detector and a recognizer trained to tell the people apart; cached -------------

FACE_PACK = "tiny_colour_pack"
"""The insightface pack name of the miniature's face models."""


@dataclass(frozen=True)
class RecognizerSettings:
    """A random recognizer's embeddings follow the aligned crop's pixels: two photos of one person have cosine 0.996,
    but two people one attribute apart 0.92, so the face-ID loss (the paper's λ·(1 − cos)) hardly tells a wrong eye
    colour from a right one. Real ArcFace is trained to tell people apart; so is this one, on every person of the
    world (ArcFace's additive angular margin): 0.97 for one person, 0.38 for the most alike two (seed 2)."""
    photos_per_person: int = 16
    steps: int = 600
    batch_size: int = 256
    lr: float = 3e-3
    margin: float = 0.3
    scale: float = 16.0
    embed_dim: int = 64

    def key(self, seed: int) -> str:
        """Of the settings, the seed and the world (its palettes)."""
        return cache_key(asdict(self), seed, ATTRIBUTES)


def tiny_face_pack(settings: RecognizerSettings, seed: int, workdir: Path) -> Path:
    """The cached insightface root (models/FACE_PACK: the tiny `colour` detector and a recognizer) for these settings
    and seed, trained here the first time: photos of every person, aligned as `prepare` aligns them (the detector of
    a pack with a random recognizer), and the recognizer learns to tell the 128 people apart
    (`train.pretrain.train_recognizer`)."""
    root = workdir / f"faces-{settings.key(seed)}"
    if (root / TRAINED_FILE).is_file():
        log.info("face model pack: cached %s", root)
        return root
    started = time.perf_counter()
    scratch = workdir / f"{root.name}-data"
    shutil.rmtree(scratch, ignore_errors=True)
    detector_pack = write_model_pack(scratch / "insightface", FACE_PACK, settings.embed_dim, face_measure="colour")
    analyzer = load_face_analyzer(scratch / "insightface", FACE_PACK, "CPU", DET_SIZE)
    rng = np.random.default_rng([seed, 6])
    people = all_identities()
    crops, labels = [], []
    for number, person in enumerate(people):
        for _ in range(settings.photos_per_person):
            crop = arcface_crop(analyzer, render_photo(person, PhotoVariation.draw(rng)), min_face_size=8)
            if not isinstance(crop, str):
                crops.append(crop)
                labels.append(number)
    pixels = (torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() - 127.5) / 127.5  # insightface's input
    torch.manual_seed(seed)
    model = TinyRecognizer(settings.embed_dim)
    loss = train_recognizer(model, pixels, torch.tensor(labels), len(people), settings.steps, settings.batch_size,
                            settings.lr, seed, settings.margin, settings.scale)
    folder = root / "models" / FACE_PACK
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(detector_pack / "det_tiny.onnx", folder / "det_tiny.onnx")
    export_recognizer_model(model, folder / "rec_tiny.onnx")
    shutil.rmtree(scratch)
    record = dict(seconds=time.perf_counter() - started, arcface_loss=loss, crops=len(crops), settings=asdict(settings),
                  seed=seed)
    (root / TRAINED_FILE).write_text(json.dumps(record))
    log.info("face model pack: recognizer trained in %.0f s (ArcFace loss %.3f), cached in %s", record["seconds"],
             loss, root)
    return root
