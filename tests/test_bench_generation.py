"""Smoke test of bench/identity_generation.py (identity in generated images, in miniature): its synthetic faces are
what the demo's tiny insightface pack detects and tells apart, and the whole run goes through at --quick settings
(seconds; nothing is learned). The benchmark itself (minutes) is not a test."""
from __future__ import annotations

import numpy as np

from bench import identity_generation as generation
from idadapter_core.face import load_face_analyzer
from idadapter_core.face.similarity import face_embeddings
from train.tiny_face_models import write_model_pack
from test_train_fit import one_thread  # noqa: F401  (module-wide fixture: one torch thread)


def test_synthetic_faces_are_detected_and_told_apart(tmp_path):
    write_model_pack(tmp_path, generation.PACK)
    analyzer = load_face_analyzer(tmp_path, generation.PACK, "CPU", generation.DET_SIZE)
    rng = np.random.default_rng(0)
    identities = generation.make_face_identities(4, generation.Settings.marks, rng, "id")
    photos = [[generation.draw_face(identity, rng) for _ in range(3)] for identity in identities]
    embeddings = [face_embeddings(analyzer, group) for group in photos]
    assert all(e is not None for group in embeddings for e in group)
    within = [float(a @ b) for group in embeddings for a in group for b in group]
    across = [float(a @ b) for i, g in enumerate(embeddings) for j, h in enumerate(embeddings) if i < j
              for a in g for b in h]
    assert min(within) > max(across)


def test_generation_bench_runs_end_to_end(tmp_path, capsys):
    assert generation.main(["--quick", "--seeds", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("IDAdapter | held-out", "Inv-Adapter | training", "base model alone | held-out",
                "reference photos | held-out"):
        assert row in out
    assert len(list(tmp_path.glob(f"base-*/{generation.TRAINED_FILE}"))) == 1  # the cached base model
