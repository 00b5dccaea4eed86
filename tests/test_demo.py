"""The README's first command, `python -m train demo` (train/demo.py): prepare -> fit -> export -> eval on tiny models
built in code, run end to end through the command line parser; CPU, nothing downloaded."""
from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_assets_or_skip
from idadapter_core import load_idadapter
from train.__main__ import build_parser
from train.checkpoints import ADAPTER_FILE
from train.demo import MARKER, DemoError, claim_output, identity_of, loss_summary
from train_fixtures import forget_accelerate_state

pytestmark = pytest.mark.usefixtures("no_downloads")  # module-wide: a download fails the test

STEPS = 3


def run_demo(*argv: str):
    forget_accelerate_state()
    args = build_parser().parse_args(["demo", *argv])
    return args.run(args)


def test_demo_runs_the_trainer_end_to_end_on_synthetic_photos(tmp_path):
    out = tmp_path / "demo"
    result = run_demo("--out", str(out), "--steps", str(STEPS), "--synthetic")
    assert result.photos.description.startswith("synthetic photos (--synthetic): 9 images of 3 identities")
    assert (result.prepared.kept_images, result.prepared.kept_identities, result.prepared.skipped) == (9, 3, [])

    # fit: STEPS steps, a checkpoint, a sample grid of the 4 references | 2 prompts at 32 px
    assert result.trained.step == STEPS and len(result.trained.losses) == STEPS
    assert Image.open(out / "run" / "samples" / f"step-{STEPS:08d}.png").size == ((4 + 2) * 32, 32)
    assert list((out / "run" / "logs").rglob("events.out.tfevents.*"))

    # export: fp16 weights that load on the tiny base and equal the checkpoint's tensors, cast
    weights = load_idadapter(result.weights, require_known_base=False)
    checkpoint = load_idadapter(result.trained.checkpoint / ADAPTER_FILE, require_known_base=False).state_dict()
    assert all(torch.equal(t, checkpoint[k].half()) for k, t in weights.state_dict().items())
    assert weights.config.num_refs == 4 and weights.config.mff.face_dim == 64

    # eval: 3 identities x 2 prompts; the random models draw noise, so no face; each identity's 3 photos show the
    # same face (its marks on other backgrounds at other places), so its references agree with each other fully
    with (out / "eval" / "similarity.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["identity"], r["similarity"]) for r in rows] == [
        (f"person{i}", "no face") for i in (1, 2, 3) for _ in range(2)]
    assert all(np.asarray(Image.open(out / "eval" / r["image"])).shape == (32, 32, 3) for r in rows)
    assert Image.open(out / "eval" / "grid.png").size == ((3 + 2) * 32, 3 * 32)
    for name in ("person1", "person2", "person3"):
        assert result.evaluation.references_used[name] == 3
        assert result.evaluation.reference_similarity[name] == pytest.approx(1.0, abs=1e-5)

    # the report: its numbers are the run's
    text = result.report.read_text(encoding="utf-8")
    losses = loss_summary(result.trained.losses)
    assert f"diffusion loss {losses['first']:.4f} at step 1 -> {losses['last']:.4f} at step {STEPS}" in text
    assert losses["first"] == result.trained.losses[0]["diffusion_loss"] and losses["window"] == STEPS
    table = re.findall(r"^\| (person\d) \| (.+?) \| 0 \| (no face) \|$", text, re.MULTILINE)
    assert [(name, prompt, score) for name, prompt, score in table] == [
        (r["identity"], r["prompt"], r["similarity"]) for r in rows]
    assert "Mean: no face in any image (0 of 6 images with a face)" in text
    assert str(result.weights) in text and str(out / "eval" / "grid.png") in text

    # a second run replaces the demo's own outputs; a folder the demo did not write is refused
    assert (out / MARKER).is_file()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DemoError, match="was not written by the demo"):
        claim_output(other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_demo_groups_a_flat_photo_folder_by_file_name():
    assert [identity_of(n) for n in ("obama.jpg", "obama2.jpg", "obama_partial_face.jpg", "biden.jpg", "32bit.png")] \
        == ["obama", "obama", "obama", "biden", "32bit"]


def test_your_photos_need_a_real_face_model(tmp_path):
    with pytest.raises(DemoError, match="--photos needs --insightface-root"):
        run_demo("--out", str(tmp_path / "demo"), "--photos", str(tmp_path))
    assert not (tmp_path / "demo").exists()  # refused before anything is built


@pytest.mark.slow
def test_demo_uses_the_shared_photos_with_the_real_face_model(tmp_path):
    """With ../shared/assets present (CI) and no flag, the demo prepares the real photos with the stand-in insightface
    pack; Obama's four photos agree with each other at the level the stand-in recognizer gives (0.71-0.76)."""
    assets = shared_assets_or_skip()
    result = run_demo("--out", str(tmp_path / "demo"), "--steps", "2")
    assert result.photos.description.startswith("real photos: 6 photos of 3 people (32bit, biden, obama)")
    assert result.photos.face_model == "standin_scrfd_mbf128" and result.photos.insightface_root == assets / "insightface"
    assert result.prepared.kept_images == 6
    assert 0.6 < result.evaluation.reference_similarity["obama"] < 0.95
    assert result.evaluation.reference_similarity["biden"] is None  # one photo
