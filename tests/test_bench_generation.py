"""The miniature world (train/miniature.py) of bench/identity_generation.py (identity in generated images): its
read-out is exact on the people it renders and tells a wrong drawing from a right one, the tiny pack's colour
detector finds every person, and the whole report runs end to end at --quick settings (seconds; nothing is learned).
The benchmark itself (about half an hour a seed) is not a test."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import identity_generation as generation
from idadapter_core.face import load_face_analyzer
from idadapter_core.face.similarity import face_embeddings
from train import miniature as world
from train.models import load_clip_vision
from train.pretrain import train_unet
from train.tiny_face_models import write_model_pack

pytestmark = pytest.mark.usefixtures("one_thread")


def test_read_out_is_exact_on_every_rendered_person():
    rng = np.random.default_rng(0)
    people = world.all_identities()
    assert len(people) == 128 and abs(world.CHANCE - 0.3125) < 1e-9
    for person in people:
        for _ in range(3):
            reading = world.read_image(world.render_photo(person, world.PhotoVariation.draw(rng)))
            assert reading.values == person and reading.well_formed


def test_photos_written_again_to_a_folder_replace_the_earlier_ones(tmp_path):
    """A reused workdir's earlier people must not join the data set: `prepare` reads every person's folder there (a
    run with 120 training people once left 24 behind, and a later run with 96 trained on 120)."""
    people = world.all_identities()
    world.write_photos(people[:3], 3, tmp_path / "photos", np.random.default_rng(0))
    written = world.write_photos(people[1:3], 2, tmp_path / "photos", np.random.default_rng(1))
    on_disk = sorted(path for path in (tmp_path / "photos").rglob("*") if path.is_file())
    assert on_disk == sorted(path for paths in written.values() for path in paths)
    assert sorted(folder.name for folder in (tmp_path / "photos").iterdir()) == sorted(
        world.identity_name(person) for person in people[1:3])


def test_read_out_sees_a_changed_attribute_and_a_malformed_image():
    variation = world.PhotoVariation((120.0, 120.0, 120.0), 1.0, (0, 0))
    person = (0, 1, 2, 1)
    image = world.render_photo(person, variation)
    changed = image.copy()
    top = world.FACE_ORIGIN
    face = changed[top:top + world.FACE_SIDE, top:top + world.FACE_SIDE]
    face[4:, :4] = face[4:, 12:] = world.colour("skin", 0)  # the long hair cut
    face[4:8, 4:7] = face[4:8, 9:12] = world.colour("eyes", 0)  # other eyes
    reading = world.read_image(changed)
    assert reading.values == (0, 1, 0, 0) and reading.well_formed
    grey = np.full_like(image, 128)
    assert not world.read_image(grey).well_formed
    smeared = (0.5 * image + 0.5 * 128).astype(np.uint8)  # a washed-out face is no palette colour
    assert not world.read_image(smeared).well_formed
    brighter = world.render_photo(person, world.PhotoVariation((60.0, 64.0, 58.0), 1.08, (world.SHIFT, 0)))
    reading = world.read_image(brighter)
    assert reading.values == person and reading.well_formed and reading.background < 70


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_the_base_trains_its_text_encoder_with_the_unet_when_asked(train_text_encoder):
    """A random frozen text encoder separated the eye words too little on one seed (BaseSettings.train_text_encoder):
    the miniature's base trains it with the UNet, and the UNet alone trains otherwise."""
    parts = world.build_base_parts(seed=0)
    before = {name: p.clone() for name, p in parts.text_encoder.named_parameters()}
    people = world.all_identities()[:4]
    rng = np.random.default_rng(0)
    pixels = world.photo_tensor([world.render_photo(p, world.PhotoVariation.draw(rng)) for p in people])
    losses = train_unet(parts, pixels, [world.attribute_caption(p) for p in people], steps=2, batch_size=2, lr=1e-3,
                        seed=0, ema_decay=0.9, train_text_encoder=train_text_encoder)
    assert len(losses) == 2 and np.isfinite(losses).all()
    moved = [name for name, p in parts.text_encoder.named_parameters() if not torch.equal(p, before[name])]
    assert bool(moved) == train_text_encoder
    assert not parts.text_encoder.training and not parts.unet.training


def test_the_clip_vision_model_learns_to_name_the_attributes_and_is_cached(tmp_path):
    """The miniature's CLIP vision model is trained (a random one's features say little about the attributes): its
    contrastive loss over the 128 people's captions falls far below chance's ln 128 = 4.85, and a second call reuses
    it."""
    base_folder = tmp_path / "base"
    world.save_base_model(world.build_base_parts(seed=0), base_folder)
    write_model_pack(tmp_path / "insightface", world.FACE_PACK, face_measure="colour")
    analyzer = load_face_analyzer(tmp_path / "insightface", world.FACE_PACK, "CPU", world.DET_SIZE)
    settings = world.ClipSettings(photos_per_person=1, steps=150, batch_size=64)
    folder = world.tiny_clip_vision(settings, base_folder, analyzer, 0, tmp_path)
    record = world.training_record(folder)
    assert record["crops"] == 128 and record["contrastive_loss"] < 1.0
    clip = load_clip_vision(folder)
    assert clip.num_patches == 64 and not (tmp_path / f"{folder.name}-data").exists()
    trained_at = (folder / world.TRAINED_FILE).stat().st_mtime_ns
    assert world.tiny_clip_vision(settings, base_folder, analyzer, 0, tmp_path) == folder
    assert (folder / world.TRAINED_FILE).stat().st_mtime_ns == trained_at


def test_the_recognizer_learns_to_tell_the_people_apart_and_is_cached(tmp_path):
    """The miniature's recognizer is trained (ArcFace's margin loss over the 128 people): through insightface's own
    loading and `get_feat`, photos of one person stay close, and the two most alike people (one attribute apart) come
    far apart, where the random recognizer's embeddings follow the pixels (measured: cosine 0.92 for them, 0.66 after
    150 steps, 0.38 after the default 600); a second call reuses the pack."""
    settings = world.RecognizerSettings(photos_per_person=2, steps=150, batch_size=128)
    root = world.tiny_face_pack(settings, 0, tmp_path)
    assert world.training_record(root)["crops"] == 256 and not (tmp_path / f"{root.name}-data").exists()
    write_model_pack(tmp_path / "random", world.FACE_PACK, face_measure="colour")
    rng = np.random.default_rng(4)
    people = world.all_identities()[::9]
    photos = [world.render_photo(person, world.PhotoVariation.draw(rng)) for person in people for _ in range(2)]
    one_person = np.kron(np.eye(len(people)), np.ones((2, 2))).astype(bool)

    def cosines(pack_root) -> tuple[float, float]:
        """(mean cosine of two photos of one person, largest of two people)."""
        analyzer = load_face_analyzer(pack_root, world.FACE_PACK, "CPU", world.DET_SIZE)
        embeddings = np.stack(face_embeddings(analyzer, photos))
        similarity = embeddings @ embeddings.T
        two_photos = one_person & ~np.eye(len(photos), dtype=bool)
        return float(similarity[two_photos].mean()), float(similarity[~one_person].max())

    (trained_same, trained_alike), (random_same, random_alike) = cosines(root), cosines(tmp_path / "random")
    assert trained_same > 0.9 and random_alike > 0.85 and trained_alike < random_alike - 0.2
    trained_at = (root / world.TRAINED_FILE).stat().st_mtime_ns
    assert world.tiny_face_pack(settings, 0, tmp_path) == root
    assert (root / world.TRAINED_FILE).stat().st_mtime_ns == trained_at


def test_colour_detector_finds_every_person_and_the_red_one_none(tmp_path):
    write_model_pack(tmp_path, "colour", face_measure="colour")
    write_model_pack(tmp_path, "red")
    rng = np.random.default_rng(1)
    photos = [world.render_photo(person, world.PhotoVariation.draw(rng)) for person in world.all_identities()[::4]]
    found = face_embeddings(load_face_analyzer(tmp_path, "colour", "CPU", world.DET_SIZE), photos)
    assert all(embedding is not None for embedding in found)
    red = face_embeddings(load_face_analyzer(tmp_path, "red", "CPU", world.DET_SIZE), photos[:8])
    assert all(embedding is None for embedding in red)


def test_row_read_out_scores_matching_and_shuffled():
    rng = np.random.default_rng(2)
    people = world.all_identities()[:3]
    images = {p: np.stack([world.render_photo(p, world.PhotoVariation.draw(rng))] * 2) for p in people}  # copies
    row = generation.read_row(images, {p: float(world.read_image(images[p][0]).background) for p in people})
    assert row.matching == [1.0] * 4 and row.well_formed == 1.0
    # (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), each scored as the next: skin and hair agree, eyes and length in 1 of 3
    assert np.allclose(row.shuffled, [1, 1, 1 / 3, 1 / 3]) and np.isclose(row.margin, 1 / 3)
    assert np.isclose(row.background_correlation, 1.0)  # the references' backgrounds copied


def test_generation_bench_runs_end_to_end(tmp_path, capsys):
    picture, results = tmp_path / "grid.png", tmp_path / "seed.json"
    assert generation.main(["--quick", "--seeds", "1", "--workdir", str(tmp_path), "--picture", str(picture),
                            "--json", str(results)]) == 0
    out = capsys.readouterr().out
    for row in ("chance", "reference photos (read-out)", "VAE round trip", "base alone, plain caption (floor)",
                "base told the attributes (ceiling)", "IDAdapter, cfg 3, guided", "IDAdapter, cfg 3, same as positive",
                "Inv-Adapter, cfg 1", "Inv-Adapter, fixed low-timestep reference, cfg 3, guided",
                "Inv-Adapter, faster mode (skip highest resolution), cfg 3, guided"):
        assert row in out
    summary = json.loads(results.read_text())
    assert summary["table"]["reference photos (read-out)"]["accuracy"]["mean"] == 1.0
    assert len(list(tmp_path.glob(f"base-*/{world.TRAINED_FILE}"))) == 1  # the cached base model
    assert len(list(tmp_path.glob(f"clip-*/{world.TRAINED_FILE}"))) == 1  # and CLIP vision model
    assert len(list(tmp_path.glob(f"faces-*/{world.TRAINED_FILE}"))) == 1  # and face model pack
    assert picture.stat().st_size > 0
    assert generation.main(["--from-json", str(results), str(results)]) == 0
    assert "seed 0" in capsys.readouterr().out


def test_the_methods_in_two_processes_give_the_same_rows_as_one_after_the_other(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    for jobs, path in (("1", one), ("2", two)):
        assert generation.main(["--quick", "--seeds", "1", "--workdir", str(tmp_path), "--inv-variants",
                                "fixed low-timestep reference", "--jobs", jobs, "--json", str(path)]) == 0
    rows_one, rows_two = (json.loads(path.read_text())["seeds"][0]["rows"] for path in (one, two))
    assert list(rows_two) == list(rows_one) and rows_two == rows_one
    assert len([name for name in rows_one if name.startswith(("IDAdapter", "Inv-Adapter"))]) == 7
    seconds = json.loads(two.read_text())["seeds"][0]["seconds"]
    assert seconds["IDAdapter"] > seconds["data, read-out, floor and ceiling"]  # counted from the seed's start


def test_each_method_in_its_own_run_merges_into_one_seed(tmp_path, capsys):
    """Inv-Adapter alone trains no CLIP vision model; the two methods run apart, for one seed, print as one seed with
    both methods' rows."""
    inv, idadapter = tmp_path / "inv.json", tmp_path / "idadapter.json"
    assert generation.main(["--quick", "--seeds", "1", "--workdir", str(tmp_path), "--methods", "inv-adapter",
                            "--inv-variants", "--json", str(inv)]) == 0
    out = capsys.readouterr().out
    assert "Inv-Adapter, cfg 3, guided" in out and "IDAdapter, cfg" not in out
    assert not list(tmp_path.glob("clip-*"))  # IDAdapter's CLIP vision model is not trained for Inv-Adapter alone
    assert generation.main(["--quick", "--seeds", "1", "--workdir", str(tmp_path), "--methods", "idadapter",
                            "--json", str(idadapter)]) == 0
    settings, seeds = generation.load_results([inv, idadapter])
    assert settings.methods == generation.METHODS and [seed.seed for seed in seeds] == [0]
    assert {"Inv-Adapter, cfg 3, guided", "IDAdapter, cfg 3, guided", "VAE round trip"} <= set(seeds[0].rows)
    capsys.readouterr()
    assert generation.main(["--from-json", str(inv), str(idadapter)]) == 0
    assert "IDAdapter, cfg 3, guided" in capsys.readouterr().out
    longer = json.loads(idadapter.read_text())
    longer["settings"]["steps"] += 1
    idadapter.write_text(json.dumps(longer))
    with pytest.raises(SystemExit, match="other settings"):
        generation.load_results([inv, idadapter])


def test_each_method_trains_its_own_step_count(tmp_path, monkeypatch):
    """IDAdapter trains `idadapter_steps`, Inv-Adapter `steps`, each with its rate's schedule over its own count; a run
    written before the two counts were apart reads as IDAdapter trained `steps`."""
    trained = []
    run = generation.TrainingSession.run

    def counting(session, steps, desc="train"):
        trained.append((desc, steps, session.config.max_steps))
        return run(session, steps, desc)

    monkeypatch.setattr(generation.TrainingSession, "run", counting)
    results = tmp_path / "seed.json"
    assert generation.main(["--quick", "--seeds", "1", "--workdir", str(tmp_path), "--inv-variants", "--steps", "2",
                            "--idadapter-steps", "3", "--json", str(results)]) == 0
    assert trained == [("seed 0: IDAdapter", 3, 3), ("seed 0: Inv-Adapter", 2, 2)]
    summary = json.loads(results.read_text())
    assert generation.settings_from_json(summary["settings"]).idadapter_steps == 3
    del summary["settings"]["idadapter_steps"]
    assert generation.settings_from_json(summary["settings"]).idadapter_steps == 2
