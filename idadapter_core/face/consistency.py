"""Are the reference faces one person? IDAdapter mixes every reference into one identity (eqs. 3-5), so a photo of
someone else silently changes who is generated. The references' ArcFace embeddings are compared pairwise (the
cosine that Face Similarity reports): references linked by a similarity of at least the threshold, directly or
through others, count as one person; those outside the largest such group are named with their mean similarity to
it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..schedule import require_finite

log = logging.getLogger(__name__)

DEFAULT_SAME_PERSON_THRESHOLD = 0.3
"""[I] Pairwise ArcFace cosine below which two references are not taken for one person. Measured with the stand-in
recognizer on real photos: same person 0.65-0.86 (0.71-0.76 for three full-face photos of one man), different
people -0.03-0.10; 0.3 lies well inside that gap, on the low side because age, pose and light lower same-person
scores of the 512-d antelopev2 / buffalo_l models, whose different-person pairs rarely pass 0.2."""


@dataclass
class IdentityCheck:
    similarity: np.ndarray
    """(K, K) pairwise cosine of the K references' ArcFace embeddings."""
    names: list[str]
    person: list[int]
    """The references taken for the person (the largest group; the first one's on a tie)."""
    others: dict[int, float]
    """The references outside it, each with its mean similarity to it."""
    threshold: float

    def warning(self) -> str | None:
        if not self.others:
            return None
        odd = ", ".join(f"{self.names[i]} (similarity {s:.2f})" for i, s in self.others.items())
        person = ", ".join(self.names[i] for i in self.person)
        return (
            f"the reference photos do not look like one person: {odd} against {person}, below the threshold "
            f"{self.threshold:.2f}. All references are mixed into one identity; remove the photos of anyone else, "
            "or lower the identity threshold if they do show the same person."
        )


def check_one_person(embeddings: np.ndarray, names: Sequence[str], threshold: float = DEFAULT_SAME_PERSON_THRESHOLD) -> IdentityCheck:
    """Group K L2-normalised embeddings (K, D) by pairwise cosine >= `threshold` (single linkage)."""
    require_finite(identity_threshold=threshold)
    embeddings = np.asarray(embeddings, np.float64)
    similarity = embeddings @ embeddings.T
    count = len(embeddings)
    group = list(range(count))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in range(count):
        for j in range(i + 1, count):
            if similarity[i, j] >= threshold:
                group[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(root(i), []).append(i)
    person = max(members.values(), key=len)  # max keeps the first of equal sizes, the group of reference 1
    others = {i: float(similarity[i, person].mean()) for i in range(count) if i not in person}
    return IdentityCheck(similarity, list(names), person, others, threshold)
