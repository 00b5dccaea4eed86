"""The diffusers host binding on a tiny UNet2DConditionModel: what attaching changes and what detaching restores."""
import pytest
import torch

from conftest import tiny_adapter, tiny_features, tiny_unet_config
from idadapter_core import IncompatibleWeightsError, splice_identity_token
from idadapter_core.hosts import (
    DiffusersIDAdapter, layout_from_diffusers_unet, transformer_blocks_in_forward_order,
)


def unet_inputs(batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([500] * batch), torch.randn(batch, 6, 24, generator=g)


def run(unet, latents, t, context):
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=context).sample


def test_layout_lists_every_block_in_forward_order(tiny_unet):
    layout = layout_from_diffusers_unet(tiny_unet)
    # down: 16 (1 layer), 32 (2 layers); middle: 32 (2 layers); up: 2 attentions x 2 layers at 32, 2 x 1 at 16
    assert layout.block_channels == (16, 32, 32) + (32, 32) + (32, 32, 32, 32, 16, 16)
    assert layout.context_dim == 24 and layout.base == "custom"
    assert len(transformer_blocks_in_forward_order(tiny_unet)) == layout.num_blocks


def identity(adapter, batch=1):
    patches, faces, image_embeds = tiny_features(adapter.config, batch=batch)
    return adapter.encode(patches, faces, image_embeds)


def test_closed_gates_give_bit_identical_output(tiny_unet):
    inputs = unet_inputs()
    bare = run(tiny_unet, *inputs)
    adapter = tiny_adapter(layout_from_diffusers_unet(tiny_unet))
    with DiffusersIDAdapter(tiny_unet, adapter) as binding:
        binding.set_identity(identity(adapter).reference_tokens)
        assert torch.equal(run(tiny_unet, *inputs), bare)


def test_open_gates_change_output_and_zero_weight_does_not(tiny_unet):
    inputs = unet_inputs()
    bare = run(tiny_unet, *inputs)
    adapter = tiny_adapter(layout_from_diffusers_unet(tiny_unet), open_gates=True)
    with DiffusersIDAdapter(tiny_unet, adapter) as binding:
        binding.set_identity(identity(adapter).reference_tokens)
        changed = run(tiny_unet, *inputs)
        assert (changed - bare).abs().max() > 1e-3
        binding.weight = 0.0
        assert torch.equal(run(tiny_unet, *inputs), bare)


def test_every_block_runs_its_adapter(tiny_unet):
    adapter = tiny_adapter(layout_from_diffusers_unet(tiny_unet), open_gates=True)
    seen = []
    for index, block in enumerate(adapter.blocks):
        block.ff.register_forward_hook(lambda m, a, o, i=index: seen.append(i))
    with DiffusersIDAdapter(tiny_unet, adapter) as binding:
        binding.set_identity(identity(adapter).reference_tokens)
        run(tiny_unet, *unet_inputs())
    assert seen == list(range(len(adapter.blocks)))


def test_detach_restores_state_dict_exactly(tiny_unet):
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    params_before = {k: id(p) for k, p in tiny_unet.named_parameters()}
    adapter = tiny_adapter(layout_from_diffusers_unet(tiny_unet), open_gates=True)
    with torch.no_grad():
        for kv in adapter.cross_kv:
            kv.to_k.diff.normal_(std=0.1)
            kv.to_v.diff.normal_(std=0.1)
    binding = DiffusersIDAdapter(tiny_unet, adapter)
    binding.set_identity(identity(adapter).reference_tokens)
    run(tiny_unet, *unet_inputs())
    binding.detach()
    after = tiny_unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {k: id(p) for k, p in tiny_unet.named_parameters()} == params_before


def test_cross_kv_deltas_are_applied_while_attached(tiny_unet):
    adapter = tiny_adapter(layout_from_diffusers_unet(tiny_unet))
    block = transformer_blocks_in_forward_order(tiny_unet)[3]
    base = block.attn2.to_k.weight.detach().clone()
    with torch.no_grad():
        adapter.cross_kv[3].to_k.diff.fill_(0.25)
    with DiffusersIDAdapter(tiny_unet, adapter):
        torch.testing.assert_close(block.attn2.to_k.weight, base + 0.25)
    assert torch.equal(block.attn2.to_k.weight, base)


def test_gradients_reach_every_trainable_parameter(tiny_unet):
    """Diffusion loss through the UNet with E_r from MFF and E_c spliced into a tiny CLIP text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=24, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=8,
                                                bos_token_id=1, eos_token_id=2, pad_token_id=0))
    layout = layout_from_diffusers_unet(tiny_unet, text_widths={"h": 24})
    adapter = tiny_adapter(layout, open_gates=True)
    for p in [*tiny_unet.parameters(), *text_encoder.parameters()]:
        p.requires_grad_(False)
    embeds = identity(adapter, batch=2)
    trigger_id = 7
    token_ids = torch.tensor([[1, 3, 7, 2, 0, 0], [1, 7, 4, 5, 2, 0]])
    splice = text_encoder.get_input_embeddings().register_forward_hook(
        lambda m, a, out: splice_identity_token(out, a[0], trigger_id, embeds.identity_tokens["h"])
    )
    context = text_encoder(token_ids).last_hidden_state
    splice.remove()
    latents, t, _ = unet_inputs()
    with DiffusersIDAdapter(tiny_unet, adapter) as binding:
        binding.set_identity(embeds.reference_tokens)
        loss = tiny_unet(latents, t, encoder_hidden_states=context).sample.pow(2).mean()
        loss.backward()
    no_grad = [n for n, p in adapter.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(not p.requires_grad or p.grad is None for p in tiny_unet.parameters())


def test_refuses_adapter_for_another_unet(tiny_unet):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=16))
    adapter = tiny_adapter(layout_from_diffusers_unet(other))
    with pytest.raises(IncompatibleWeightsError, match="context 16.*context 24"):
        DiffusersIDAdapter(tiny_unet, adapter)


def test_weight_scales_the_trained_kv_too_unless_in_the_papers_form(tiny_unet):
    inputs = unet_inputs()
    bare = run(tiny_unet, *inputs)
    adapter = tiny_adapter(layout_from_diffusers_unet(tiny_unet))  # closed gates: only the K/V differences act
    with torch.no_grad():
        for kv in adapter.cross_kv:
            kv.to_k.diff.normal_(std=0.1)
            kv.to_v.diff.normal_(std=0.1)
    with DiffusersIDAdapter(tiny_unet, adapter, weight=0.0) as binding:
        binding.set_identity(identity(adapter).reference_tokens)
        assert torch.equal(run(tiny_unet, *inputs), bare)
        binding.weight = 1.0
        full = run(tiny_unet, *inputs)
        assert (full - bare).abs().max() > 1e-3
        binding.weight, binding.kv_follows_weight = 0.0, False
        assert torch.equal(run(tiny_unet, *inputs), full)


def test_inv_adapter_rows_without_the_eaa_are_the_plain_unet_exactly(tiny_unet):
    """`set_reference(features, rows)`: the unselected rows equal the unpatched UNet bit for bit, the selected ones
    what the EAA gives every row (as classifier-free guidance over the identity uses it: EAA off in the negative
    half)."""
    from idadapter_core.hosts import DiffusersInvAdapter
    from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig

    latents, t, context = unet_inputs(batch=4)
    bare = run(tiny_unet, latents, t, context)
    torch.manual_seed(0)
    adapter = InvAdapter(InvAdapterConfig(layout_from_diffusers_unet(tiny_unet)))
    with torch.no_grad():
        for block in adapter.blocks:
            block.self_gate.fill_(0.8)
            block.cross_v.weight.normal_(std=0.3)
    with DiffusersInvAdapter(tiny_unet, adapter) as binding:
        features = binding.record_reference(latents[:1], t[:1], context[:1])
        binding.set_reference(features)
        everywhere = run(tiny_unet, latents, t, context)
        binding.set_reference(features, rows=torch.tensor([False, True, False, True]))
        some = run(tiny_unet, latents, t, context)
        binding.set_reference(features, rows=torch.zeros(4, dtype=torch.bool))
        assert torch.equal(run(tiny_unet, latents, t, context), bare)
        binding.set_reference(features, rows=torch.ones(2, dtype=torch.bool))
        with pytest.raises(ValueError, match="row mask has 2 rows, the batch 4"):
            run(tiny_unet, latents, t, context)
        binding.set_reference(None)
        assert binding.rows is None
    assert (everywhere - bare).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert torch.equal(some[0::2], bare[0::2])
    torch.testing.assert_close(some[1::2], everywhere[1::2], rtol=0, atol=1e-6)  # (the EAA rows run as a sub-batch)


def test_inv_adapter_acts_only_in_its_blocks(tiny_unet):
    """`binding.blocks` (Apply Inv-Adapter's `blocks` mode): the other blocks run their own attention, so with no
    block the UNet is the plain one bit for bit, and the faster mode's blocks change the output less than all."""
    from idadapter_core.hosts import DiffusersInvAdapter
    from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig
    from idadapter_core.schedule import adapter_blocks

    latents, t, context = unet_inputs(batch=2)
    bare = run(tiny_unet, latents, t, context)
    layout = layout_from_diffusers_unet(tiny_unet)
    torch.manual_seed(0)
    adapter = InvAdapter(InvAdapterConfig(layout))
    with torch.no_grad():
        for block in adapter.blocks:
            block.self_gate.fill_(0.8)
            block.cross_v.weight.normal_(std=0.3)
    with DiffusersInvAdapter(tiny_unet, adapter) as binding:
        binding.set_reference(binding.record_reference(latents[:1], t[:1], context[:1]))
        everywhere = run(tiny_unet, latents, t, context)
        binding.blocks = adapter_blocks(layout, "skip highest resolution")
        faster = run(tiny_unet, latents, t, context)
        binding.blocks = frozenset()
        assert torch.equal(run(tiny_unet, latents, t, context), bare)
        binding.blocks = frozenset(range(layout.num_blocks))
        assert torch.equal(run(tiny_unet, latents, t, context), everywhere)
    assert len(adapter_blocks(layout, "skip highest resolution")) == layout.num_blocks - 3  # the three 16-channel ones
    assert 1e-3 < (faster - bare).abs().max() and (faster - everywhere).abs().max() > 1e-3
