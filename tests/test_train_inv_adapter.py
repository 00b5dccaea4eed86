"""`python -m train fit` with `method: inv-adapter` (train/inv_adapter_step.py): the same prepare/fit/export path
trains Inv-Adapter's EAA alone, on tiny local models (tests/train_fixtures.py), CPU, nothing downloaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from idadapter_core.hosts import DiffusersInvAdapter
from idadapter_core.inv_adapter import InvAdapter, load_inv_adapter
from train.checkpoints import ADAPTER_FILE, CHECKPOINTS_DIR
from train.config import ConfigError, resolve_config
from train.export import export_checkpoint
from train.fit import build_training_step, train
from train.cache import TrainCache
from train.generate import inv_adapter_reference
from train.inv_adapter_step import trajectory_input
from train.models import load_base_model
from train.tiny_models import RESOLUTION
from train_fixtures import forget_accelerate_state, settings

pytestmark = pytest.mark.usefixtures("no_downloads", "one_thread")


def inv_settings(ws, out: str, **overrides) -> dict:
    values = settings(ws, out, method="inv-adapter", clip_vision="", face_id_weight=0.0, identity_dropout=0.0,
                      max_steps=3, checkpoint_every=3, inversion_steps=2)
    values.update(overrides)
    return values


@pytest.mark.parametrize("reference_features", ["noised", "inversion"])
def test_fit_trains_only_the_eaa_and_exports_an_inv_adapter_file(workspace, reference_features, tmp_path):
    config = resolve_config(None, inv_settings(workspace, f"inv-{reference_features}", reference_features=reference_features,
                                               inversion_steps=4))
    torch.manual_seed(config.seed)
    initial = {k: v.clone() for k, v in build_training_step(config, TrainCache(config.cache), torch.device("cpu"))[0]
               .adapter.state_dict().items()}
    forget_accelerate_state()
    result = train(config)
    assert isinstance(result.adapter, InvAdapter) and result.step == 3
    assert all(torch.isfinite(torch.tensor(step["loss"])) for step in result.losses)
    trained = result.adapter.state_dict()
    assert set(trained) == set(initial)  # only the EAA is trained and saved
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert any(k.endswith("self_gate") for k in changed) and any(k.endswith("cross_v.weight") for k in changed)
    checkpoint = workspace["root"] / f"inv-{reference_features}" / CHECKPOINTS_DIR / "step-00000003"
    assert (checkpoint / ADAPTER_FILE).is_file()
    out = export_checkpoint(checkpoint, tmp_path / "inv.safetensors", dtype="fp32")
    loaded = load_inv_adapter(out, require_known_base=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
    kept = list((workspace["root"] / f"inv-{reference_features}" / "inversions").glob("*/*.safetensors"))
    assert bool(kept) == (reference_features == "inversion")  # a file per reference row drawn


def test_kept_inversions_are_read_one_point_at_a_time_by_another_process(tmp_path):
    from train.inv_adapter_step import TrajectoryStore

    sigmas, trajectories = torch.tensor([0.1, 1.0, 10.0]), torch.randn(3, 2, 4, 8, 8)
    TrajectoryStore(tmp_path / "run").keep([7, 9], sigmas, trajectories)
    again = TrajectoryStore(tmp_path / "run")  # another process, e.g. after --resume
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["7.safetensors", "9.safetensors"]
    assert again.has(7) and again.has(9) and not again.has(8)
    alpha = 1 / (1 + 1.0**2)  # the timestep whose noise level is σ = 1: the middle point
    torch.testing.assert_close(again.point(7, alpha), trajectories[1, :1] * alpha**0.5, rtol=1e-3, atol=1e-3)  # float16
    torch.testing.assert_close(again.point(9, alpha), trajectories[1, 1:] * alpha**0.5, rtol=1e-3, atol=1e-3)
    near_zero = again.point(9, 0.999)  # σ = 0.03: the first point
    torch.testing.assert_close(near_zero, trajectories[0, 1:] * 0.999**0.5, rtol=1e-3, atol=1e-3)


def test_a_steps_new_references_are_inverted_together_once_as_each_would_be_alone(workspace):  # noqa: F811
    """Rows 3, 5, 3, 8: one batched inversion of rows 3, 5 and 8 (row 3 from its first sample), equal to inverting
    each alone; the next step, with rows 5 and 8 kept and 11 new, inverts row 11 alone."""
    from train.inv_adapter_step import invert_latent
    from train.real_size_models import random_inv_adapter_batch

    config = resolve_config(None, inv_settings(workspace, "inv-batched", inversion_steps=3))
    step = build_training_step(config, TrainCache(config.cache), torch.device("cpu"))[0]
    base, inverted = step.frozen.base, []
    batch = random_inv_adapter_batch(base, 4, RESOLUTION)
    batch.reference_rows = [3, 5, 3, 8]
    batch.timesteps = torch.tensor([999, 500, 10, 700])
    invert = step._invert
    step._invert = lambda latents, *args: inverted.append(latents.clone()) or invert(latents, *args)
    with torch.no_grad():
        null_context = base.text.encode(batch.null_token_ids)[0]
        first = step._reference_inputs(batch, null_context, None)
        assert [len(latents) for latents in inverted] == [3]
        torch.testing.assert_close(inverted[0], batch.reference_latents[[0, 1, 3]])
        for sample in range(4):  # each as its row's trajectory, inverted alone, gives at the sample's timestep
            row_sample = {3: 0, 5: 1, 8: 3}[batch.reference_rows[sample]]
            sigmas, alone = invert_latent(base, batch.reference_latents[row_sample : row_sample + 1],
                                          null_context[:1], 3)
            alpha = float(base.noise_scheduler.alphas_cumprod[batch.timesteps[sample]])
            expected = trajectory_input(sigmas, alone, alpha)
            torch.testing.assert_close(first[sample : sample + 1], expected, rtol=2e-3, atol=2e-3)  # kept in float16
        batch.reference_rows = [5, 11, 8, 11]
        step._reference_inputs(batch, null_context, None)
    assert [len(latents) for latents in inverted] == [3, 1]
    torch.testing.assert_close(inverted[1], batch.reference_latents[1:2])


def test_eaa_starts_as_a_copy_of_each_blocks_self_attention_and_leaves_the_unet_unchanged(workspace):  # noqa: F811
    config = resolve_config(None, inv_settings(workspace, "inv-init"))
    step, clip = build_training_step(config, TrainCache(config.cache), torch.device("cpu"))
    assert clip is None
    unet = step.frozen.base.unet
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert torch.equal(step.adapter.blocks[0].self_k.weight, blocks[0].attn1.to_k.weight)
    assert all(float(b.self_gate) == 0 and not b.cross_v.weight.any() for b in step.adapter.blocks)
    step.frozen.binding.detach()
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        bare = unet(x, 10, encoder_hidden_states=context).sample
        with DiffusersInvAdapter(unet, step.adapter) as binding:
            binding.set_reference(binding.record_reference(ref, 10, context))
            assert torch.equal(unet(x, 10, encoder_hidden_states=context).sample, bare)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_fit_logs_inv_adapter_sample_grids(workspace, kind):  # noqa: F811
    """sample_every for Inv-Adapter: the identity's first image | one generation per prompt, from the EAA as trained
    (its DDIM inversion, as fit trains by default), with guidance over the identity; each grid differs from the step
    before."""
    from PIL import Image

    out = workspace["root"] / f"inv-samples-{kind}"
    config = resolve_config(None, inv_settings(workspace, out.name, pretrained=str(workspace[kind]), max_steps=2,
                                               sample_every=1, sample_steps=2, sample_identity="alice",
                                               sample_prompts=["a portrait photo", "a photo"], lr=5e-2))
    forget_accelerate_state()
    train(config)
    grids = [np.asarray(Image.open(out / "samples" / f"step-0000000{step}.png")) for step in (1, 2)]
    assert grids[0].shape == (RESOLUTION, 3 * RESOLUTION, 3)
    first = TrainCache(config.cache).identities()["alice"][0]
    shown, _ = inv_adapter_reference(load_base_model(config), first.image, RESOLUTION)
    assert np.array_equal(grids[0][:, :RESOLUTION], shown)
    assert np.array_equal(grids[0][:, :RESOLUTION], grids[1][:, :RESOLUTION])
    assert not np.array_equal(grids[0][:, RESOLUTION:], grids[1][:, RESOLUTION:])  # the EAA trained in between


def test_inv_adapter_settings_are_checked(workspace):  # noqa: F811
    with pytest.raises(ConfigError, match="reference_features must be one of"):
        resolve_config(None, inv_settings(workspace, "inv-bad", reference_features="magic"))
