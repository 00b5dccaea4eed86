"""What a training step trains on (DESIGN.md §2.6): per sample an identity, a target image with its caption, and
N references of the same identity; and the frozen features of those, computed once.

Order. Everything random about a sample is a pure function of (seed, sample index): the target is position
`index % R` of epoch `index // R`'s permutation of the R cached images, and its references, identity dropout, flip,
noise and timestep come from a generator seeded with (seed, index). Micro-step s of process p out of P takes the
samples s·B·P + p·B + j, j < B (B the per-process batch size), so processes draw different samples and a run's
position is one step counter: a resumed run sees exactly the samples an uninterrupted one would.

References. N images of the target's identity other than the target (disjoint, DESIGN.md §2.6 [I]) when it has that
many; otherwise all the others, filled up with the cache's augmented copies (flip, rotation, colour, DESIGN.md §2.2)
of those images, or of the target when it is the identity's only image; without augmented copies in the cache,
images are repeated (the paper's replication). Their order is shuffled (DESIGN.md §2.2: the image slot carries no
meaning).

Frozen features. The VAE latent distribution of each target (mean and std; a latent is drawn from it per sample
with the sample's generator, so caching changes nothing) and the CLIP features of each reference crop
(`clip_encoder_from_transformers`, the function the nodes' parity is defined against) are computed on first use and
kept (`FrozenFeatures`), in memory or as files; with caching off they are computed every time (for benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idadapter_core.face import load_image, to_rgb_uint8

from .cache import CacheError, TrainCache
from idadapter_core.weights import atomic_write
from .config import ConfigError

_ORDER, _SAMPLE = 0, 1
"""Purposes mixed into the seed sequences, so the epoch order and the per-sample draws are independent streams."""


@dataclass(frozen=True)
class ReferenceKey:
    """One reference image: a cache row, itself (augmentation -1) or its k-th cached augmented copy."""

    row: int
    augmentation: int = -1


@dataclass(frozen=True)
class Sample:
    index: int
    """The global sample index (see the module docstring)."""
    row: int
    """The target image's cache row."""
    references: tuple[ReferenceKey, ...]
    keep_identity: bool
    """False for the identity-dropout samples (classifier-free guidance)."""
    flip: bool
    seed: int
    """Seeds the sample's latent draw, noise and timestep."""


class SamplePlan:
    """The samples of every micro-step, as a pure function of the seed (module docstring)."""

    def __init__(self, cache: TrainCache, seed: int, num_refs: int, identity_dropout: float = 0.0,
                 random_flip: bool = False) -> None:
        self.cache = cache
        self.seed = seed
        self.num_refs = num_refs
        self.identity_dropout = identity_dropout
        self.random_flip = random_flip
        self.num_augmentations = cache.num_augmentations
        self.rows_of_identity = {name: [r.row for r in records] for name, records in cache.identities().items()}
        self.identity_of_row = [record.identity for record in cache.records]
        self._orders: dict[int, np.ndarray] = {}
        if not cache.records:
            raise CacheError(f"the training cache {cache.path} has no images; prepare it from a dataset with faces")

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, _ORDER, epoch]).permutation(len(self.cache.records))}
        return self._orders[epoch]

    def sample(self, index: int) -> Sample:
        epoch, position = divmod(index, len(self.cache.records))
        row = int(self.epoch_order(epoch)[position])
        rng = np.random.default_rng([self.seed, _SAMPLE, index])
        references = self.references(row, rng)
        keep_identity = bool(rng.random() >= self.identity_dropout)
        flip = bool(self.random_flip and rng.random() < 0.5)
        return Sample(index, row, references, keep_identity, flip, int(rng.integers(0, 2**63 - 1)))

    def references(self, row: int, rng: np.random.Generator) -> tuple[ReferenceKey, ...]:
        n = self.num_refs
        others = [r for r in self.rows_of_identity[self.identity_of_row[row]] if r != row]
        if len(others) >= n:
            chosen = [ReferenceKey(int(r)) for r in rng.choice(others, size=n, replace=False)]
        else:
            chosen = [ReferenceKey(r) for r in others]
            sources = others or [row]
            missing = n - len(chosen)
            if self.num_augmentations:
                copies = [ReferenceKey(r, k) for r in sources for k in range(self.num_augmentations)]
                picks = rng.choice(len(copies), size=missing, replace=missing > len(copies))
                chosen += [copies[i] for i in picks]
            else:
                chosen += [ReferenceKey(int(r)) for r in rng.choice(sources, size=missing, replace=True)]
        order = rng.permutation(n)
        return tuple(chosen[i] for i in order)

    def identity_references(self, identity: str) -> tuple[ReferenceKey, ...]:
        """N fixed references of one identity (for sample grids): its first N images, filled up with their augmented
        copies (or repeated without any)."""
        if identity not in self.rows_of_identity:
            known = ", ".join(list(self.rows_of_identity)[:5])
            raise ConfigError(f"sample identity '{identity}' is not in the training cache (it has {known}, ...)")
        rows = self.rows_of_identity[identity]
        chosen = [ReferenceKey(r) for r in rows[: self.num_refs]]
        copies = [ReferenceKey(r, k) for k in range(self.num_augmentations) for r in rows] or chosen
        while len(chosen) < self.num_refs:
            chosen.append(copies[(len(chosen) - len(rows)) % len(copies)])
        return tuple(chosen)

    def step_samples(self, micro_step: int, batch_size: int, process_index: int = 0,
                     num_processes: int = 1) -> list[Sample]:
        start = (micro_step * num_processes + process_index) * batch_size
        return [self.sample(start + j) for j in range(batch_size)]


def load_target_image(
    path: str | Path, resolution: int, flip: bool = False
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(3, R, R) float32 in [-1, 1]: shorter side resized to R (bicubic), centre-cropped (our choice), optionally
    flipped; and SDXL's micro-conditioning (original height, original width, crop top, crop left)."""
    from PIL import Image

    rgb = to_rgb_uint8(load_image(path))
    height, width = rgb.shape[:2]
    scale = resolution / min(height, width)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    resized = np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))
    top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    crop = resized[top:top + resolution, left:left + resolution]
    if flip:
        crop = crop[:, ::-1]
    pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, (height, width, top, left)


class FrozenFeatures:
    """Frozen-model features by cache key, computed on first use and kept when `enabled` (module docstring).

    `vae` and `clip_encoder` run on `device` under no_grad. With `deterministic`, each image is encoded on its own,
    so a feature's bits never depend on which other images were missing from the cache in the same step (a resumed
    run then matches an uninterrupted one exactly); otherwise a step's missing images are encoded as one batch."""

    def __init__(self, cache: TrainCache, vae, clip_encoder, resolution: int, device: torch.device,
                 enabled: bool = True, directory: str | Path | None = None, deterministic: bool = False) -> None:
        self.cache = cache
        self.vae = vae
        self.clip_encoder = clip_encoder
        self.resolution = resolution
        self.device = device
        self.enabled = enabled
        self.directory = Path(directory) if directory is not None and enabled else None
        self.chunk = 1 if deterministic else None
        self._memory: dict[tuple, dict[str, torch.Tensor]] = {}
        self.computed = 0
        """How many features were computed (not found cached): what a benchmark of caching reads."""

    def latents(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """'mean', 'std' (B, C, h, w) of each target's VAE latent distribution (unscaled) and 'time_ids' (B, 6)."""
        keys = [("latent", s.row, int(s.flip)) for s in samples]
        return self._stack(keys, self._encode_targets)

    def references(self, reference_sets: list[tuple[ReferenceKey, ...]]) -> dict[str, torch.Tensor]:
        """'clip_patches' (B, N, P, W), 'clip_image_embeds' (B, N, E) and 'face_embeds' (B, N, D) of B sets of N
        references."""
        keys = [("clip", ref.row, ref.augmentation) for references in reference_sets for ref in references]
        clip = self._stack(keys, self._encode_crops)
        face = torch.stack([self._arcface(ref) for references in reference_sets for ref in references])
        shape = (len(reference_sets), len(reference_sets[0]))
        return {
            "clip_patches": clip["patches"].reshape(*shape, *clip["patches"].shape[1:]),
            "clip_image_embeds": clip["image_embeds"].reshape(*shape, -1),
            "face_embeds": face.reshape(*shape, -1),
        }

    def clip_crop(self, ref: ReferenceKey) -> torch.Tensor:
        """(224, 224, 3) uint8 CLIP crop of a reference, from the cache."""
        if ref.augmentation < 0:
            return self.cache.clip_crop(ref.row)
        return self.cache.clip_crop_aug(ref.row, ref.augmentation)

    def _arcface(self, ref: ReferenceKey) -> torch.Tensor:
        if ref.augmentation < 0:
            return self.cache.arcface(ref.row)
        return self.cache.arcface_aug(ref.row, ref.augmentation)

    def _stack(self, keys: list[tuple], encode) -> dict[str, torch.Tensor]:
        found = {key: self._lookup(key) for key in dict.fromkeys(keys)}
        missing = [key for key, value in found.items() if value is None]
        chunk = self.chunk or max(len(missing), 1)
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            with torch.no_grad():
                computed = encode(part)
            self.computed += len(part)
            for i, key in enumerate(part):
                found[key] = {name: t[i].cpu() for name, t in computed.items()}
                self._store(key, found[key])
        names = found[keys[0]].keys()
        return {name: torch.stack([found[key][name] for key in keys]) for name in names}

    def _path(self, key: tuple) -> Path:
        return self.directory / key[0] / f"{'-'.join(str(part) for part in key[1:])}.safetensors"

    def _lookup(self, key: tuple) -> dict[str, torch.Tensor] | None:
        if not self.enabled:
            return None
        if self.directory is None:
            return self._memory.get(key)
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))

    def _store(self, key: tuple, value: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        if self.directory is None:
            self._memory[key] = value
            return
        from safetensors.torch import save_file

        tensors = {name: t.contiguous() for name, t in value.items()}
        atomic_write(self._path(key), lambda tmp: save_file(tensors, tmp))

    def _encode_targets(self, keys: list[tuple]) -> dict[str, torch.Tensor]:
        images, time_ids = [], []
        for _, row, flip in keys:
            image = self.cache.records[row].image
            pixels, (height, width, top, left) = load_target_image(image, self.resolution, bool(flip))
            images.append(pixels)
            time_ids.append(torch.tensor([height, width, top, left, self.resolution, self.resolution], dtype=torch.float32))
        pixels = torch.stack(images).to(self.device, self.vae.dtype)
        distribution = self.vae.encode(pixels).latent_dist
        return {"mean": distribution.mean, "std": distribution.std, "time_ids": torch.stack(time_ids)}

    def _encode_crops(self, keys: list[tuple]) -> dict[str, torch.Tensor]:
        crops = [self.clip_crop(ReferenceKey(row, augmentation)) for _, row, augmentation in keys]
        hidden, image_embeds = self.clip_encoder(torch.stack(crops).float() / 255.0)
        return {"patches": hidden[:, 1:], "image_embeds": image_embeds}
