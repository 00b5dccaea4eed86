"""Inv-Adapter's core and its diffusers binding: the EAA's maths, an untrained EAA leaving the UNet bit-identical,
DDIM inversion, the weights file."""
import math

import pytest
import torch

from conftest import tiny_unet_config
from idadapter_core.attention import has_lse_attention, sdpa_attention
from idadapter_core.errors import IncompatibleWeightsError, WeightsFormatError
from idadapter_core.hosts import layout_from_diffusers_unet, transformer_blocks_in_forward_order
from idadapter_core.hosts.diffusers_inv_adapter import DiffusersInvAdapter, diffusers_denoiser
from idadapter_core.inv_adapter import (
    EAABlock, InvAdapter, InvAdapterConfig, ReferenceTrajectory, count_inv_adapter_parameters, ddim_invert,
    inversion_sigmas, load_inv_adapter, save_inv_adapter,
)
from idadapter_core.presets import PRESETS


def test_parameter_count_of_the_sd15_preset():
    """The paper says 48 M; our inferred form (4 C x C projections per block, 16 blocks) gives 4·ΣC² + 16 gates."""
    count = count_inv_adapter_parameters(InvAdapterConfig.for_base("sd15"))
    print(f"Inv-Adapter EAA, SD1.5 preset: {count:,} trainable parameters ({count / 1e6:.2f} M; paper: 48 M)")
    assert count == 4 * sum(c * c for c in PRESETS["sd15"].block_channels) + 16 == 49_561_616


def open_eaa(adapter: InvAdapter, seed: int = 3) -> InvAdapter:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in adapter.blocks:
            block.self_gate.fill_(0.6)
            block.cross_v.weight.copy_(torch.randn(block.cross_v.weight.shape, generator=g) * 0.2)
    return adapter


def test_eaa_is_attention_over_the_appended_reference_and_a_decoupled_cross_attention():
    torch.manual_seed(0)
    block = EAABlock(16)
    with torch.no_grad():
        block.self_gate.fill_(20.0)  # tanh = 1: pure attention over [own tokens, reference tokens]
        block.cross_v.weight.normal_()
    q, k, v = (torch.randn(2, 10, 16) for _ in range(3))
    text_k, text_v = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    ref = block.reference_kv(torch.randn(1, 7, 16))

    def attend(q, k, v):  # plain softmax attention, 2 heads of 8
        q, k, v = (t.view(t.shape[0], t.shape[1], 2, 8).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
        return (weights @ v).transpose(1, 2).reshape(q.shape[0], -1, 16)

    appended = attend(q, torch.cat([k, ref.self_key.expand(2, -1, -1)], 1), torch.cat([v, ref.self_value.expand(2, -1, -1)], 1))
    torch.testing.assert_close(block.self_attention(q, k, v, ref, heads=2), appended, atol=1e-5, rtol=1e-5)
    decoupled = attend(q, text_k, text_v) + 0.5 * attend(q, ref.cross_key.expand(2, -1, -1), ref.cross_value.expand(2, -1, -1))
    torch.testing.assert_close(block.cross_attention(q, text_k, text_v, ref, heads=2, weight=0.5), decoupled, atol=1e-5, rtol=1e-5)


def test_eaa_self_attention_merged_by_log_sum_exp_equals_the_appended_form():
    """Without gradients on CPU the change Attn(Q, [K; K'], [V; V']) − Attn(Q, K, V) comes from two attentions merged
    by their log-sum-exp; it equals the appended form (what training computes), with and without the host's own
    kernel for the own part and a mask."""
    torch.manual_seed(0)
    block = EAABlock(32)
    with torch.no_grad():
        block.self_gate.fill_(0.4)
    q, k, v = (torch.randn(2, 48, 32) * 3 for _ in range(3))
    ref = block.reference_kv(torch.randn(1, 40, 32) * 3)
    mask = torch.rand(2, 48, 1)
    def own(q, k, v, heads):  # the host's own kernel: plain softmax attention, the same in math
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        return (weights @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    appended = [block.self_attention(q, k, v, ref, heads=4, weight=0.8, own_attention=o, mask=m).detach()
                for o in (None, own) for m in (None, mask)]
    assert not has_lse_attention(q, block.self_gate)  # with gradients: the appended form
    with torch.no_grad():
        assert has_lse_attention(q, block.self_gate)
        merged = [block.self_attention(q, k, v, ref, heads=4, weight=0.8, own_attention=o, mask=m)
                  for o in (None, own) for m in (None, mask)]
        assert torch.equal(block.self_attention(q, k, v, ref, heads=4, weight=0.0, own_attention=own), own(q, k, v, 4))
    for fast, slow in zip(merged, appended):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert (appended[0] - sdpa_attention(q, k, v, 4)).abs().max() > 1e-2  # the reference changes the output


@pytest.fixture
def unet_and_inputs():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).eval()
    g = torch.Generator().manual_seed(1)
    x, ref, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    return unet, x, ref, context


def run(unet, binding, x, ref, context, t=400):
    with torch.no_grad():
        if binding is not None:
            binding.set_reference(binding.record_reference(ref, t, context[:1]))
        return unet(x, t, encoder_hidden_states=context).sample


def test_untrained_eaa_leaves_the_unet_bit_identical_and_trained_one_changes_it(unet_and_inputs):
    unet, x, ref, context = unet_and_inputs
    bare = run(unet, None, x, ref, context)
    torch.manual_seed(5)
    adapter = InvAdapter(InvAdapterConfig(layout_from_diffusers_unet(unet)))
    with DiffusersInvAdapter(unet, adapter) as binding:
        assert torch.equal(run(unet, binding, x, ref, context), bare)
        open_eaa(adapter)
        changed = run(unet, binding, x, ref, context)
        binding.weight = 0.0
        assert torch.equal(run(unet, binding, x, ref, context), bare)
    assert (changed - bare).abs().max() > 1e-3
    assert torch.equal(run(unet, None, x, ref, context), bare)  # detached: the original processors are back
    assert all(type(m.processor).__name__ != "_EAAProcessor" for n, m in unet.named_modules() if n.endswith(("attn1", "attn2")))


def test_reference_features_are_each_blocks_self_attention_input(unet_and_inputs):
    unet, x, ref, context = unet_and_inputs
    adapter = InvAdapter(InvAdapterConfig(layout_from_diffusers_unet(unet)))
    seen = {}

    def keep_input(index):
        def hook(module, args, kwargs):
            seen[index] = kwargs.get("hidden_states", args[0] if args else None)
        return hook

    handles = [block.attn1.register_forward_pre_hook(keep_input(i), with_kwargs=True)
               for i, block in enumerate(transformer_blocks_in_forward_order(unet))]
    with DiffusersInvAdapter(unet, adapter) as binding, torch.no_grad():
        features = binding.record_reference(ref, 300, context[:1])
    for h in handles:
        h.remove()
    assert len(features) == adapter.config.layout.num_blocks == 11
    for i, feature in enumerate(features):
        assert torch.equal(feature, seen[i])
        assert feature.shape[-1] == adapter.config.layout.block_channels[i]


def test_gradients_reach_only_the_eaa(unet_and_inputs):
    unet, x, ref, context = unet_and_inputs
    unet.requires_grad_(False)
    adapter = InvAdapter(InvAdapterConfig(layout_from_diffusers_unet(unet)))
    with DiffusersInvAdapter(unet, adapter) as binding:
        binding.set_reference(binding.record_reference(ref, 400, context[:1]))
        unet(x, 400, encoder_hidden_states=context).sample.square().mean().backward()
    grads = {name: p.grad for name, p in adapter.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(grads[f"blocks.{i}.self_gate"].abs() > 0 for i in range(len(adapter.blocks)))
    assert all(grads[f"blocks.{i}.cross_v.weight"].abs().max() > 0 for i in range(len(adapter.blocks)))


def test_weights_round_trip_and_refusals(tmp_path, unet_and_inputs):
    unet = unet_and_inputs[0]
    adapter = open_eaa(InvAdapter(InvAdapterConfig(layout_from_diffusers_unet(unet))))
    path = tmp_path / "inv.safetensors"
    save_inv_adapter(path, adapter)
    loaded = load_inv_adapter(path, model_layout=layout_from_diffusers_unet(unet))
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(IncompatibleWeightsError, match="use Inv-Adapter weights trained for sd15"):
        load_inv_adapter(path, model_layout=PRESETS["sd15"])
    from idadapter_core import IDAdapter, IDAdapterConfig, save_idadapter
    from conftest import TINY_MFF

    other = tmp_path / "idadapter.safetensors"
    save_idadapter(other, IDAdapter(IDAdapterConfig(layout=PRESETS["sd15"], mff=TINY_MFF, clip_embed_dim=12)))
    with pytest.raises(WeightsFormatError, match="is a 'idadapter' file; expected 'inv-adapter'"):
        load_inv_adapter(other)


def test_inversion_follows_the_probability_flow_of_gaussian_data():
    """For data N(0, s²) the ideal denoiser is x·s²/(s²+σ²) and the deterministic DDIM path is x_σ = x_0·sqrt(s²+σ²)/s:
    inverting with the ideal denoiser must follow it (Euler error shrinks with the step count)."""
    s = 1.0
    denoise = lambda x, sigma: x * s * s / (s * s + sigma * sigma)
    schedule = torch.linspace(0.03, 14.6, 1000)
    x0 = torch.randn(1, 4, 8, 8)
    errors = []
    for steps in (50, 200):
        sigmas = inversion_sigmas(schedule, steps)
        trajectory = ddim_invert(denoise, x0 * math.sqrt(s * s + sigmas[0] ** 2) / s, sigmas)
        exact = torch.stack([x0 * math.sqrt(s * s + float(sg) ** 2) / s for sg in sigmas])
        errors.append(float(((trajectory - exact).norm() / exact.norm())))
    assert errors[1] < errors[0] / 3 and errors[0] < 0.15  # first order: 4x the steps, about 4x less error


def test_trajectory_lookup_lock_step_and_fixed():
    trajectory = ReferenceTrajectory(torch.tensor([0.03, 0.5, 2.0, 14.6]), torch.zeros(4, 1, 4, 8, 8), {}, "m")
    assert [trajectory.index_for(s) for s in (0.02, 0.4, 1.5, 3.0, 20.0)] == [0, 1, 2, 2, 3]
    assert trajectory.index_for(10.0, timestep_sigma=0.05) == 0


def test_diffusers_denoiser_inverts_in_the_schedules_own_timesteps(unet_and_inputs):
    from diffusers import DDPMScheduler

    unet, x, ref, context = unet_and_inputs
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    denoise, schedule = diffusers_denoiser(unet, scheduler.alphas_cumprod, "epsilon", context[:1])
    sigmas = inversion_sigmas(schedule, 4)
    assert torch.equal(sigmas, schedule[torch.tensor([0, 250, 500, 749, 999])])
    with torch.no_grad():
        trajectory = ddim_invert(denoise, ref, sigmas)
        eps = unet(ref * (1 / (1 + sigmas[0] ** 2)) ** 0.5, 0, encoder_hidden_states=context[:1]).sample
    assert trajectory.shape == (5, 1, 4, 8, 8) and torch.isfinite(trajectory).all()
    a0 = float(scheduler.alphas_cumprod[0])
    x0 = (ref * a0**0.5 - (1 - a0) ** 0.5 * eps) / a0**0.5
    torch.testing.assert_close(trajectory[1], x0 + (ref - x0) * (sigmas[1] / sigmas[0]), atol=1e-5, rtol=1e-5)
