"""Identity similarity between reference photos and generated images: the paper's ID-Sim (docs/DESIGN.md §2.8),
the cosine of ArcFace embeddings of aligned faces, here with whatever recognizer the FaceAnalyzer holds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import NoFaceError
from .alignment import arcface_crop
from .images import as_image_list, to_rgb_uint8
from .models import FaceAnalyzer


@dataclass
class SimilarityReport:
    scores: list[float | None]
    """Cosine similarity of each generated image to the mean reference embedding; None where no face was found."""
    reference_faces: int

    def summary(self) -> str:
        lines = [f"ID similarity to {self.reference_faces} reference face(s) (ArcFace cosine, 1 = same face):"]
        for index, score in enumerate(self.scores):
            lines.append(f"  image {index + 1}: " + ("no face found" if score is None else f"{score:.3f}"))
        found = [s for s in self.scores if s is not None]
        if found:
            lines.append(f"  mean over {len(found)} image(s) with a face: {np.mean(found):.3f}")
        return "\n".join(lines)


def face_embeddings(analyzer: FaceAnalyzer, images: torch.Tensor | Sequence) -> list[np.ndarray | None]:
    """The L2-normalised ArcFace embedding of the largest face in each image (None where there is none)."""
    out: list[np.ndarray | None] = []
    for index, image in enumerate(as_image_list(images)):
        crop = arcface_crop(analyzer, to_rgb_uint8(image), index, min_face_size=0)
        out.append(None if isinstance(crop, str) else analyzer.embed(crop))
    return out


def identity_similarity(analyzer: FaceAnalyzer, references: torch.Tensor | Sequence, generated: torch.Tensor | Sequence) -> SimilarityReport:
    reference_embeds = [e for e in face_embeddings(analyzer, references) if e is not None]
    if not reference_embeds:
        raise NoFaceError("no face found in any reference image; Face Similarity needs at least one")
    mean = np.mean(reference_embeds, axis=0)
    mean /= max(float(np.linalg.norm(mean)), 1e-12)
    scores = [None if e is None else float(np.dot(e, mean)) for e in face_embeddings(analyzer, generated)]
    return SimilarityReport(scores, len(reference_embeds))
