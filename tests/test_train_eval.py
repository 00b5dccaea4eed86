"""`python -m train eval` (train/eval.py, train/generate.py) end to end on tiny local models: fit 2 steps -> export ->
eval on one identity x two prompts; CPU, nothing downloaded."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idadapter_core.errors import IncompatibleWeightsError
from idadapter_core.face import face_embeddings, identity_similarity, load_face_analyzer, load_image
from train.__main__ import main
from train.eval import (
    EvalError, collect_references, evaluate, leave_one_out_similarity, load_eval_models, read_prompts,
)
from train.export import export_checkpoint
from train.fit import train
from train.config import resolve_config
from train.generate import SamplingSettings
from train.tiny_face_models import write_model_pack
from train.tiny_models import RESOLUTION, write_tiny_clip_vision, write_tiny_pipeline
from train_fixtures import FACE_DIM, FACE_PACK, forget_accelerate_state, write_tiny_cache

pytestmark = pytest.mark.usefixtures("no_downloads", "one_thread")

PROMPTS = ["a portrait photo", "a photo of a woman smiling outdoors"]
NUM_REFS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A 2-step run on the tiny cache (alice 3 images, bob 2, carol 1), exported to fp16."""
    root = tmp_path_factory.mktemp("eval")
    pack_root, cache = write_tiny_cache(root)
    paths = {"root": root, "insightface": pack_root, "identities": root / "identities",
             "clip": write_tiny_clip_vision(root / "clip"), "sd15": write_tiny_pipeline(root / "sd15"),
             "sdxl": write_tiny_pipeline(root / "sdxl", "sdxl")}
    config = resolve_config(None, dict(
        cache=str(cache), output_dir=str(root / "run"), pretrained=str(paths["sd15"]), clip_vision=str(paths["clip"]),
        face_id_weight=0.0, num_refs=NUM_REFS, mff_width=16, mff_heads=2, batch_size=2, max_steps=2,
        checkpoint_every=2, resolution=RESOLUTION, lr=1e-3, log_with="none",
    ))
    forget_accelerate_state()
    train(config)
    paths["weights"] = export_checkpoint(root / "run", root / "idadapter.safetensors", dtype="fp16")
    return paths


def eval_command(trained: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["eval", str(trained["weights"]), "--pretrained", str(trained["sd15"]), "--clip-vision", str(trained["clip"]),
            "--insightface-root", str(trained["insightface"]), "--det-size", "320", "--references",
            str(trained["identities"] / "alice"), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "2",
            "--out", str(out), *extra]


def read_table(out: Path) -> list[dict[str, str]]:
    with (out / "similarity.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_eval_generates_scores_and_writes_the_table_and_the_grid(trained, tmp_path):
    """One identity (a flat folder) x two prompts through the CLI: the tiny random models draw no face, so every row
    says 'no face'; the grid is the 2 reference crops | the 2 generations."""
    out = tmp_path / "eval"
    assert main(eval_command(trained, out)) == 0
    rows = read_table(out)
    assert [(r["identity"], r["prompt"], r["seed"]) for r in rows] == [("alice", p, "0") for p in PROMPTS]
    assert [r["similarity"] for r in rows] == ["no face", "no face"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["mean_similarity"] is None and (summary["images"], summary["images_with_face"]) == (2, 0)
    alice = summary["identities"]["alice"]
    assert alice["references_used"] == NUM_REFS
    assert summary["settings"]["resolution"] == RESOLUTION  # the tiny base model's native size: 8 latents x 2
    assert "| alice | a portrait photo | 0 | no face |" in (out / "similarity.md").read_text(encoding="utf-8")
    assert Image.open(out / "grid.png").size == ((NUM_REFS + len(PROMPTS)) * RESOLUTION, RESOLUTION)
    images = [np.asarray(Image.open(out / r["image"])) for r in rows]
    assert all(image.shape == (RESOLUTION, RESOLUTION, 3) for image in images)
    assert not np.array_equal(images[0], images[1])  # another prompt, same seed

    # the references' own similarity is the leave-one-out cosine of their ArcFace embeddings
    analyzer = load_face_analyzer(trained["insightface"], FACE_PACK, "CPU", 320)
    photos = [load_image(p) for p in sorted((trained["identities"] / "alice").glob("*.png"))]
    embeddings = face_embeddings(analyzer, photos)
    cosines = []
    for i, embedding in enumerate(embeddings):
        others = np.mean([e for j, e in enumerate(embeddings) if j != i], axis=0)
        cosines.append(embedding @ others / np.linalg.norm(others))
    expected = np.mean(cosines)
    assert alice["reference_similarity"] == pytest.approx(expected, abs=1e-6) and alice["reference_similarity"] < 0.999

    # the adapter conditions the images: weight 0 gives other pixels with the same seed
    plain = tmp_path / "weight0"
    assert main(eval_command(trained, plain, "--weight", "0")) == 0
    assert not np.array_equal(np.asarray(Image.open(plain / read_table(plain)[0]["image"])), images[0])


def test_eval_scores_with_the_face_similarity_measure(trained, tmp_path, monkeypatch):
    """Generations replaced by (one of alice's photos, a blank image) for every identity: the table holds
    identity_similarity's scores of them against each identity's own references, and 'no face' for the blank; the
    grid shows the first 2 identities (carol first, her single reference padded with a white tile)."""
    alice = [load_image(p) for p in sorted((trained["identities"] / "alice").glob("*.png"))]
    blank = np.full_like(alice[0], 128)

    def generate(base, adapter, binding, references, prompts, class_word, seeds, settings):
        assert references["clip_patches"].shape[:2] == (1, NUM_REFS) and class_word == "person"
        return np.stack([alice[1], blank][:len(prompts)])

    monkeypatch.setattr("train.eval.generate_identity_images", generate)
    models = load_eval_models(trained["weights"], trained["clip"], trained["insightface"],
                              pretrained=str(trained["sd15"]), det_size=320, device="cpu")
    found = collect_references(trained["identities"])
    references = {name: found[name] for name in ("carol", "alice", "bob")}
    result = evaluate(models, references, PROMPTS, tmp_path, SamplingSettings(RESOLUTION, steps=2),
                      grid_identities=2)
    expected = {name: identity_similarity(models.analyzer, [load_image(p) for p in paths], [alice[1], blank]).scores
                for name, paths in references.items()}
    assert all(scores[1] is None and -1 < scores[0] < 0.999 for scores in expected.values())
    assert expected["alice"][0] > expected["bob"][0]  # alice's own photo is closest to alice
    assert [(row.identity, row.similarity) for row in result.rows] == [
        (name, score) for name, scores in expected.items() for score in scores]
    assert result.mean_similarity == pytest.approx(np.mean([scores[0] for scores in expected.values()]))
    table = read_table(tmp_path)
    assert [r["similarity"] for r in table] == [f"{s:.4f}" if s is not None else "no face"
                                                for scores in expected.values() for s in scores]
    markdown = (tmp_path / "similarity.md").read_text(encoding="utf-8")
    assert f"**Mean: {result.mean_similarity:.4f}** over 3 of 6 images" in markdown
    assert result.references_used == {"carol": 1, "alice": 2, "bob": 2}
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * RESOLUTION, (NUM_REFS + len(PROMPTS)) * RESOLUTION, 3)
    tiles = [grid[:RESOLUTION, i * RESOLUTION:(i + 1) * RESOLUTION] for i in range(NUM_REFS + len(PROMPTS))]
    assert (tiles[1] == 255).all() and not (tiles[0] == 255).all()  # carol's crop, then the padding
    assert (tiles[3] == 128).all()  # the blank "generation", resized to a tile


def test_eval_refuses_weights_for_another_base(trained, tmp_path):
    with pytest.raises(IncompatibleWeightsError, match="but the model is"):
        load_eval_models(trained["weights"], trained["clip"], trained["insightface"], pretrained=str(trained["sdxl"]))
    command = eval_command(trained, tmp_path)
    command[command.index("--pretrained") + 1] = str(trained["sdxl"])
    assert main(command) == 1


def test_eval_refuses_other_face_and_clip_models(trained, tmp_path):
    write_model_pack(tmp_path / "insightface", "wide_pack", embed_dim=FACE_DIM * 2)
    with pytest.raises(EvalError, match=f"{FACE_DIM}-d embeddings.*'wide_pack' gives {2 * FACE_DIM}-d.*--face-model"):
        load_eval_models(trained["weights"], trained["clip"], tmp_path / "insightface", face_model="wide_pack",
                         pretrained=str(trained["sd15"]))
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(  # 4 patches of 16 px instead of 16 of 8 px
        image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=12,
    )).save_pretrained(tmp_path / "other-clip")
    with pytest.raises(EvalError, match="CLIP vision 'clip' \\(16 patches x 16, image embeds 12\\).* gives 4 x 16"):
        load_eval_models(trained["weights"], tmp_path / "other-clip", trained["insightface"],
                         pretrained=str(trained["sd15"]))
    with pytest.raises(EvalError, match="either as --pretrained"):
        load_eval_models(trained["weights"], trained["clip"], trained["insightface"])


def test_references_and_prompts(trained, tmp_path):
    identities = collect_references(trained["identities"])
    assert {name: len(paths) for name, paths in identities.items()} == {"alice": 3, "bob": 2, "carol": 1}
    with pytest.raises(EvalError, match="no reference images"):
        collect_references(tmp_path)
    with pytest.raises(EvalError, match="does not exist"):
        collect_references(tmp_path / "missing")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# prompts\na photo\n\n  a portrait photo  \n", encoding="utf-8")
    assert read_prompts(prompts, ["one more"]) == ["a photo", "a portrait photo", "one more"]
    with pytest.raises(EvalError, match="no prompts"):
        read_prompts(None, ["  "])
    assert leave_one_out_similarity([np.array([1.0, 0.0])]) is None
    assert leave_one_out_similarity([np.array([1.0, 0.0]), np.array([0.0, 1.0])]) == 0.0



@pytest.fixture(scope="module")
def trained_inv_adapter(trained) -> Path:
    """Inv-Adapter trained 2 steps on the same cache and base (a high learning rate, so the EAA acts), exported."""
    root = trained["root"]
    config = resolve_config(None, dict(
        method="inv-adapter", cache=str(root / "cache"), output_dir=str(root / "inv-run"), pretrained=str(trained["sd15"]),
        face_id_weight=0.0, identity_dropout=0.0, batch_size=2, max_steps=2, checkpoint_every=2, resolution=RESOLUTION,
        lr=5e-2, log_with="none",
    ))
    forget_accelerate_state()
    train(config)
    return export_checkpoint(root / "inv-run", root / "inv_adapter.safetensors", dtype="fp16")


def inv_eval_command(trained, weights: Path, out: Path, *extra: str) -> list[str]:
    command = eval_command(trained, out, "--face-model", FACE_PACK, "--inversion-steps", "2", *extra)
    command[1] = str(weights)
    at = command.index("--clip-vision")
    return command[:at] + command[at + 2:]


def test_eval_scores_inv_adapter_weights(trained, trained_inv_adapter, tmp_path):
    """The same table, summary and grid for Inv-Adapter weights: the identity's first photo with a face is the
    reference (one grid tile), each prompt generated with guidance over the identity; weight 0 is the base model."""
    out = tmp_path / "inv"
    assert main(inv_eval_command(trained, trained_inv_adapter, out)) == 0
    rows = read_table(out)
    assert [(r["identity"], r["prompt"], r["seed"], r["similarity"]) for r in rows] == [
        ("alice", p, "0", "no face") for p in PROMPTS]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["method"] == "Inv-Adapter" and summary["identities"]["alice"]["references_used"] == 1
    assert summary["settings"]["identity_in_negative"] == "none (guided)"
    assert summary["settings"]["reference_features"] == "inversion" and "class_word" not in summary["settings"]
    assert "| alice | a portrait photo | 0 | no face |" in (out / "similarity.md").read_text(encoding="utf-8")
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (RESOLUTION, (1 + len(PROMPTS)) * RESOLUTION, 3)
    first_photo = sorted((trained["identities"] / "alice").glob("*.png"))[0]
    assert np.array_equal(grid[:, :RESOLUTION], np.asarray(Image.open(first_photo).convert("RGB").resize(
        (RESOLUTION, RESOLUTION), Image.BICUBIC)))  # (a square photo: resized, nothing cropped)
    images = [np.asarray(Image.open(out / r["image"])) for r in rows]
    outputs = {}
    for name, extra in {"base": ("--weight", "0"), "same": ("--identity-in-negative", "same as positive"),
                        "noised": ("--reference-features", "noised")}.items():
        assert main(inv_eval_command(trained, trained_inv_adapter, tmp_path / name, *extra)) == 0
        outputs[name] = np.asarray(Image.open(tmp_path / name / read_table(tmp_path / name)[0]["image"]))
    assert all(not np.array_equal(image, images[0]) for image in outputs.values())


def test_eval_names_what_each_method_needs(trained, trained_inv_adapter, tmp_path):
    with pytest.raises(EvalError, match="Inv-Adapter weights, which name no face model; pass --face-model"):
        load_eval_models(trained_inv_adapter, None, trained["insightface"], pretrained=str(trained["sd15"]))
    with pytest.raises(EvalError, match="IDAdapter weights, which need the CLIP vision model .*--clip-vision"):
        load_eval_models(trained["weights"], None, trained["insightface"], pretrained=str(trained["sd15"]))
    assert main(inv_eval_command(trained, trained_inv_adapter, tmp_path, "--reference-timestep", "-1",
                                 "--reference-features", "fixed")) == 1
