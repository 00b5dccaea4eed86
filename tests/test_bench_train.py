"""Smoke tests of the trainer's benchmarks (bench/train_throughput.py, bench/identity_learning.py) on minimal
settings: they run end to end, their synthetic cache (train/striped_faces.py) is what the trainer reads, the ablations
(train/ablations.py) switch off what they say, and the part-by-part FLOP count agrees with the FLOPs of the trainer's
own step. No timing is asserted.
The learning check itself (several minutes) is marked slow."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import identity_learning as learning
from bench import train_throughput as throughput
from train import ablations, striped_faces
from train.cache import TrainCache
from train.config import resolve_config
from train.data import SamplePlan
from train.fit import TrainingSession
from train.tiny_face_models import write_model_pack
from train.tiny_models import TINY_SPEC, build_base_components, save_base_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = throughput.Scale(1 / 16, 1 / 8)
"""64 px, 20-channel UNet, 4 CLIP patches: the smallest scale the layouts allow."""


def test_synthetic_cache_is_read_by_the_trainer(tmp_path):
    rng = np.random.default_rng(0)
    identities = striped_faces.make_identities(3, face_dim=16, rng=rng)
    images = striped_faces.make_images(identities, 3, tmp_path / "images", resolution=32, rng=rng, image_scale=2)
    ordered = [image for group in images.values() for image in group]
    cache = TrainCache(striped_faces.write_synthetic_cache(tmp_path / "cache", ordered, face_dim=16))
    assert len(cache) == 9 and cache.face_embed_dim == 16 and cache.num_augmentations == 0
    assert [r.identity for r in cache.records] == [i.identity for i in ordered]
    assert all(np.array_equal(cache.arcface(row).numpy(), image.arcface) for row, image in enumerate(ordered))
    assert np.array_equal(cache.clip_crop(4).numpy(), ordered[4].clip_crop)
    assert cache.clip_crop(0).shape == (224, 224, 3)
    from PIL import Image

    assert Image.open(cache.records[0].image).size == (64, 64)
    # identity is in the embeddings: same identity close, others far
    embeds = np.stack([image.arcface for image in ordered])
    cosine = embeds @ embeds.T
    same = np.equal.outer(np.repeat(np.arange(3), 3), np.repeat(np.arange(3), 3))
    assert cosine[same & ~np.eye(9, dtype=bool)].min() > 0.6 > np.abs(cosine[~same]).max()
    # and in the pictures: each identity's two colours fill the middle of its face crops
    for identity, group in zip(identities, images.values()):
        centre = group[0].clip_crop[80:144, 80:144].reshape(-1, 3).astype(int)
        distance = np.abs(centre[:, None] - np.array(identity.colours)[None]).sum(-1).min(1)
        assert np.median(distance) < 40
    plan = SamplePlan(cache, seed=0, num_refs=2)
    sample = plan.sample(0)
    rows = {r.row for r in sample.references}
    assert sample.row not in rows and {cache.records[r].identity for r in rows} == {cache.records[sample.row].identity}


def test_eval_set_draws_references_from_training_images(tmp_path):
    rng = np.random.default_rng(1)
    identities = striped_faces.make_identities(3, face_dim=8, rng=rng)
    images = striped_faces.make_images(identities, 4, tmp_path / "images", resolution=16, rng=rng)
    training = [image for group in images.values() for image in group[:3]]
    held_out = [image for group in images.values() for image in group[3:]]
    cache = TrainCache(striped_faces.write_synthetic_cache(tmp_path / "cache", training + held_out, face_dim=8))
    held_rows = list(range(9, 12))
    eval_set = learning.make_eval_set(cache, held_rows, num_refs=2, timesteps=[500], rng=rng)
    identity = [r.identity for r in cache.records]
    for target, matching, shuffled in zip(eval_set.targets, eval_set.matching, eval_set.shuffled):
        assert all(ref.row < 9 for ref in matching + shuffled)
        assert {identity[ref.row] for ref in matching} == {identity[target]}
        assert len({identity[ref.row] for ref in shuffled}) == 1 and identity[shuffled[0].row] != identity[target]
    assert sorted(identity[s[0].row] for s in eval_set.shuffled) == sorted(identity[t] for t in held_rows)


MINIMAL = learning.Settings(identities=3, train_images=5, held_out_images=1, steps=2, batch_size=2, base_steps=2,
                            base_batch_size=2, timesteps=(300, 700), inversion_steps=2)


def test_identity_check_runs_and_the_ablations_switch_off_their_path(tmp_path):
    result = learning.run_seed(0, MINIMAL, TINY_SPEC, tmp_path)
    assert set(result.losses) == {*learning.VARIANTS, learning.SKIPPED_AT_INFERENCE}
    assert all(math.isfinite(v) and v > 0 for losses in result.losses.values() for v in losses.values())
    assert math.isfinite(result.base_model_loss)
    # the made-up ArcFace embeddings identify every held-out image; the CLIP inputs are probed too
    assert result.probe["ArcFace embedding"] == 1.0
    assert set(result.probe) == {"CLIP image embedding", "CLIP patch tokens (mean)", "ArcFace embedding"}
    summary = learning.summarize(MINIMAL, [result, result])
    assert summary["check"] in ("PASS", "FAIL")
    assert summary["checked"] == [learning.FULL_IDADAPTER, "Inv-Adapter, DDIM-inverted references"]
    assert summary["variants"]["adapter only"]["gap"]["std"] == 0.0
    assert set(summary["skip_gap_ratio"]) == {learning.SKIPPED, learning.SKIPPED_AT_INFERENCE}
    learning.print_table(summary)
    # Inv-Adapter's "no identity" is the EAA off: the base model's loss
    inv_off = result.losses["Inv-Adapter, noised, self-attention only"]["no identity"]
    assert inv_off == pytest.approx(result.base_model_loss, rel=1e-5)

    # the ablations, on the models that run just wrote
    config = resolve_config(None, dict(
        cache=str(tmp_path / "train-cache"), output_dir=str(tmp_path / "check"), pretrained=str(tmp_path / "base"),
        clip_vision=str(tmp_path / "clip"), face_id_weight=0.0, num_refs=4, mff_width=32, mff_heads=4, batch_size=2,
        lr=1e-2, resolution=TINY_SPEC.resolution, log_with="none",
    ))
    token_only = TrainingSession(config, adjust=ablations.token_only)
    adapter_only = TrainingSession(config, adjust=ablations.adapter_only)
    full = TrainingSession(config)
    before = {name: dict(s.step_module.adapter.state_dict()) for name, s in
              (("token", token_only), ("adapter", adapter_only), ("full", full))}
    before = {name: {k: v.clone() for k, v in state.items()} for name, state in before.items()}
    for session in (token_only, adapter_only, full):
        session.run(2)
    changed = lambda name, session, prefix: any(
        not torch.equal(before[name][k], v) for k, v in session.step_module.adapter.state_dict().items()
        if k.startswith(prefix))
    gates = lambda session: [float(gate.detach()) for block in session.step_module.adapter.blocks
                             for gate in (block.alpha_attn, block.alpha_dense)]
    assert set(gates(token_only)) == {0.0} and changed("token", token_only, "id_token.")
    assert not changed("adapter", adapter_only, "id_token.") and set(gates(adapter_only)) != {0.0}
    assert changed("full", full, "id_token.") and set(gates(full)) != {0.0}
    # adapter only: the trigger word's own embedding, whatever E_c is
    text = adapter_only.step_module.frozen.base.text
    ids = text.tokenize(["a photo"], ["person"], [True])
    e_c = {"l": torch.randn(1, TINY_SPEC.text["hidden_size"])}
    assert torch.equal(text.encode(ids, e_c)[0], text.encode(ids)[0])
    assert not torch.equal(full.step_module.frozen.base.text.encode(ids, e_c)[0], text.encode(ids)[0])

    # the faster mode: the highest-resolution blocks' gates stay 0 in training, and are 0 only meanwhile at inference
    skipped = TrainingSession(config, adjust=ablations.skip_highest_resolution)
    left_out = ablations.highest_resolution_blocks(skipped.step_module)
    assert left_out and len(left_out) < len(skipped.step_module.adapter.blocks)
    skipped.run(2)
    gate_pairs = lambda session: [(block.alpha_attn.item(), block.alpha_dense.item())
                                  for block in session.step_module.adapter.blocks]
    assert all(gate_pairs(skipped)[i] == (0.0, 0.0) for i in left_out)
    assert all(pair != (0.0, 0.0) for i, pair in enumerate(gate_pairs(skipped)) if i not in left_out)
    trained = gate_pairs(full)
    with ablations.highest_resolution_skipped(full.step_module):
        assert [pair for i, pair in enumerate(gate_pairs(full)) if i in left_out] == [(0.0, 0.0)] * len(left_out)
    assert gate_pairs(full) == trained and all(trained[i] != (0.0, 0.0) for i in left_out)


def test_inv_adapter_ablations_switch_off_their_branch(tmp_path):
    """Self-attention only keeps the cross branch's W''_V at 0 (it adds an exact 0); cross-attention only keeps the
    self-attention gate closed."""
    rng = np.random.default_rng(0)
    identities = striped_faces.make_identities(2, face_dim=8, rng=rng)
    images = striped_faces.make_images(identities, 3, tmp_path / "images", resolution=32, rng=rng)
    cache = striped_faces.write_synthetic_cache(tmp_path / "cache", [i for group in images.values() for i in group],
                                                face_dim=8)
    base = save_base_model(build_base_components(TINY_SPEC, seed=0), tmp_path / "base")
    settings = learning.Settings(batch_size=2, steps=2, inversion_steps=2)
    configs = settings.method_configs(cache, base, tmp_path / "clip", tmp_path / "out", TINY_SPEC.resolution, 0)
    for variant, frozen_at_zero, trained in (
        (ablations.self_attention_only, "cross_v.weight", "self_gate"),
        (ablations.cross_attention_only, "self_gate", "cross_v.weight"),
    ):
        session = TrainingSession(resolve_config(None, configs["inv-adapter"]), adjust=variant)
        session.run(2)
        for block in session.step_module.adapter.blocks:
            assert not block.get_parameter(frozen_at_zero).count_nonzero()
            assert block.get_parameter(trained).count_nonzero()


def test_scaled_layouts_keep_the_real_shapes():
    models = throughput.scaled_spec(throughput.Scale(0.25, 0.5))
    spec = models.spec
    assert spec.unet["block_out_channels"] == (80, 160, 320, 320)
    assert spec.vae["block_out_channels"] == (32, 64, 128, 128)
    assert spec.resolution == 256 and spec.text_tokens == 19 and (models.mff_width, models.mff_heads) == (256, 4)
    # the real head widths: 40 in the UNet's first level, 64 in the text encoder, 80 in ViT-H
    assert spec.unet["attention_head_dim"] == 2 and spec.text["num_attention_heads"] == 3
    assert spec.clip_vision["num_attention_heads"] == 4
    assert spec.clip_vision["image_size"] == 112 and spec.clip_vision["hidden_size"] == 320
    real = throughput.scaled_spec(throughput.REAL).spec
    assert real.unet["block_out_channels"] == (320, 640, 1280, 1280) and real.text_tokens == 77
    assert real.clip_vision == throughput.VIT_H_14
    flops = throughput.PartFlops(step=2, face_id_gate=1, face_id_decode=3, clip_references=1, vae_encode=1)
    assert flops.expected_ratio(False) == 2.0 and flops.expected_ratio(True) == 5 / 3
    assert flops.expected_ratio(True, gate_rate=1.0) == 1 + 2 / 6


def test_part_flops_match_the_trainers_step_and_the_benchmark_runs(tmp_path, capsys):
    """The part-by-part count (meta device) against FlopCounterMode around the trainer's own step, as the benchmark
    runs it: cached (λ = 0) = the trained step, recomputed - cached = CLIP of the references + VAE encode, and
    λ = 0.1 - λ = 0 = the gate's VAE decode (with the tiny face pack: its detector runs, nothing is detected, so
    there is no decode with gradients). Batch 1: in a batch, samples that share an image share its features, which
    the per-sample parts do not count."""
    pack_root = tmp_path / "insightface"
    write_model_pack(pack_root, "tiny_pack", embed_dim=64)
    settings = throughput.Settings(scale=TINY, rounds=1, warmup=0, batch_size=1, steps_per_run=1,
                                   face_pack=(pack_root, "tiny_pack"))
    setup = throughput.build_setup(settings, tmp_path / "run")
    assert setup.face_id and setup.cached.computed == len(setup.session.cache) * 2  # latents + crops, filled
    measured = throughput.measure(setup, settings)
    assert measured["cached_features_computed_while_timed"] == 0
    parts = throughput.part_flops(throughput.scaled_spec(TINY), face_dim=64)
    step = {k: v * 1e9 for k, v in measured["step_gflops_per_sample"].items()}
    name = throughput.variant_name
    assert step[name(True, False)] == pytest.approx(parts.step, rel=0.02)
    assert step[name(False, False)] - step[name(True, False)] == pytest.approx(
        parts.clip_references + parts.vae_encode, rel=0.02)
    assert step[name(True, True)] - step[name(True, False)] == pytest.approx(parts.face_id_gate, rel=0.02)
    assert set(measured["seconds"]) == {name(c, f) for c in (True, False) for f in (True, False)}
    summary = throughput.summarize(settings, parts, parts, measured, face_id=True)
    assert [r["face_id_weight"] for r in summary["results"]] == [0.0, 0.1]
    assert {r["goal"] for r in summary["results"]} <= {"PASS", "MISS"}
    throughput.print_table(summary)
    assert "frozen: VAE encode of the target" in capsys.readouterr().out


@pytest.mark.slow
def test_identity_is_learned_over_three_seeds(capsys):
    """The learning check at its default settings (several minutes): the full model's held-out loss is lower with
    the matching identity's references than with another identity's, in every seed."""
    assert learning.main(["--seeds", "3"]) == 0
    assert "every seed): PASS" in capsys.readouterr().out
