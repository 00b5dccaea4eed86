"""The features of N references that the MFF encoder reads: ArcFace embeddings and CLIP patch tokens and image
embeddings (docs/DESIGN.md §2.2). The CLIP vision model is a callable the host supplies (`ClipEncoder`), so this runs
without ComfyUI."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import IDAdapterError
from .alignment import CLIP_CROP_SCALE, AlignedReference, align_references
from .consistency import DEFAULT_SAME_PERSON_THRESHOLD, check_one_person
from .detection import ProgressFn, SkipReason, find_reference_faces
from .images import as_image_list
from .models import FaceAnalyzer

log = logging.getLogger(__name__)

ClipEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(N, 224, 224, 3) RGB floats in [0, 1], channels last (a ComfyUI IMAGE) -> (penultimate-layer hidden
states (N, 1 + P, width) with the CLS token first, projected image embeddings (N, E))."""


@dataclass
class FaceFeatures:
    """What Extract Face Features hands to Encode Identity: per-reference features of N references, plus where
    they came from. Encode Identity calls `adapter.encode(clip_patches[None], face_embeds[None],
    clip_image_embeds[None])`."""

    face_embeds: torch.Tensor
    """(N, D) float32, L2-normalised ArcFace embeddings f_a(i); D from the recognizer."""
    clip_patches: torch.Tensor
    """(N, P, W) float32 CLIP penultimate-layer patch tokens f_v(i), CLS dropped."""
    clip_image_embeds: torch.Tensor
    """(N, E) float32 CLIP projected image embeddings f_c(i)."""
    boxes: torch.Tensor
    """(K, 4) face boxes of the K user images used, in their pixels."""
    landmarks: torch.Tensor
    """(K, 5, 2) their 5-point landmarks."""
    source_indices: list[int]
    """Which input images the K faces came from."""
    face_model: str
    reference_sources: list[int] = field(default_factory=list)
    """For each of the N references, the input image it was made from."""
    augmentations: list[str] = field(default_factory=list)
    """For each of the N references, the augmentation applied ('' for none)."""
    skipped: dict[int, SkipReason] = field(default_factory=dict)
    """Input images not used, with the reason."""
    other_people: dict[int, float] = field(default_factory=dict)
    """Input images whose face does not look like the others' (consistency.py), with its mean ArcFace similarity
    to them; they are used all the same, with a warning."""

    @property
    def face_embed_dim(self) -> int:
        return int(self.face_embeds.shape[-1])

    @property
    def num_refs(self) -> int:
        return int(self.face_embeds.shape[0])


def _distinct(references: Sequence[AlignedReference]) -> tuple[list[AlignedReference], torch.Tensor]:
    """The distinct references (a replicated one is the same object) and, per reference, its position among them."""
    distinct: dict[int, AlignedReference] = {}
    for reference in references:
        distinct.setdefault(id(reference), reference)
    position = {key: i for i, key in enumerate(distinct)}
    return list(distinct.values()), torch.tensor([position[id(r)] for r in references])


def arcface_embeddings(analyzer: FaceAnalyzer, references: Sequence[AlignedReference]) -> torch.Tensor:
    """(N, D) L2-normalised ArcFace embeddings of the aligned crops (replicated references are computed once)."""
    distinct, index = _distinct(references)
    return torch.from_numpy(np.stack([analyzer.embed(r.arcface_crop) for r in distinct]))[index]


def clip_features(encode_clip: ClipEncoder, references: Sequence[AlignedReference]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP patch tokens (N, P, W) with CLS dropped and image embeddings (N, E) of the CLIP crops, in one batch.
    Replicated references are encoded once (with one photo and the paper's replication, CLIP runs once)."""
    distinct, index = _distinct(references)
    crops = torch.from_numpy(np.stack([r.clip_crop for r in distinct])).float() / 255.0
    hidden, image_embeds = encode_clip(crops)
    if hidden.ndim != 3 or hidden.shape[0] != len(distinct) or image_embeds.shape[0] != len(distinct):
        raise IDAdapterError(
            f"the CLIP encoder returned hidden states {tuple(hidden.shape)} and image embeds {tuple(image_embeds.shape)} "
            f"for {len(distinct)} crops; expected (N, 1 + patches, width) and (N, embed)"
        )
    patches = hidden[:, 1:].float().cpu()[index].contiguous()
    return patches, image_embeds.float().cpu().reshape(len(distinct), -1)[index]


def extract_face_features(
    analyzer: FaceAnalyzer,
    images: torch.Tensor | np.ndarray | Sequence,
    encode_clip: ClipEncoder,
    num_refs: int = 4,
    fill_mode: str = "replicate",
    face_index: int | None = None,
    min_face_size: int = 64,
    seed: int = 0,
    clip_crop_scale: float = CLIP_CROP_SCALE,
    image_names: Sequence[str] | None = None,
    on_progress: ProgressFn | None = None,
    same_person_threshold: float = DEFAULT_SAME_PERSON_THRESHOLD,
) -> tuple[FaceFeatures, list[AlignedReference]]:
    """Detect, align, fill up to `num_refs`, then ArcFace and CLIP: the whole first step of an identity
    (docs/DESIGN.md §2.2, inputs of the MFF). Returns the features and the aligned references (for previews).
    `images` may differ in size. References whose faces do not look like one person are named in a warning
    (`same_person_threshold`, see consistency.py)."""
    images = as_image_list(images)
    names = list(image_names) if image_names is not None else [f"image {i + 1}/{len(images)}" for i in range(len(images))]
    faces, rgb_images, skipped = find_reference_faces(analyzer, images, face_index, min_face_size, names, on_progress)
    references = align_references(rgb_images, faces, num_refs, fill_mode, seed, analyzer.arcface_size,
                                  clip_crop_scale=clip_crop_scale)
    used = [r.face for r in references[: min(len(faces), num_refs)]]
    clip_patches, clip_image_embeds = clip_features(encode_clip, references)
    face_embeds = arcface_embeddings(analyzer, references)
    check = check_one_person(face_embeds[: len(used)].numpy(), [names[f.source_index] for f in used], same_person_threshold)
    warning = check.warning()
    if warning:
        log.warning("Face features: %s", warning)
    features = FaceFeatures(
        face_embeds=face_embeds,
        clip_patches=clip_patches,
        clip_image_embeds=clip_image_embeds,
        boxes=torch.from_numpy(np.stack([f.box for f in used])),
        landmarks=torch.from_numpy(np.stack([f.landmarks for f in used])),
        source_indices=[f.source_index for f in used],
        face_model=analyzer.name,
        reference_sources=[r.face.source_index for r in references],
        augmentations=[r.augmentation.describe() if r.augmentation else "" for r in references],
        skipped=skipped,
        other_people={used[i].source_index: similarity for i, similarity in check.others.items()},
    )
    return features, references
