"""Shapes, the gated adapter's maths and the identity-token helpers."""
import pytest
import torch

from conftest import TINY_MFF, tiny_adapter, tiny_config, tiny_features
from idadapter_core import (
    PRESETS, GatedSelfAttention, IDAdapter, IDAdapterConfig, MFFConfig, MixedFacialFeatures,
    count_trainable_parameters, format_identity_prompt, splice_identity_token,
)
from idadapter_core.presets import UNetLayout

from bench.gligen_reference import gligen_forward


@pytest.mark.parametrize("base,blocks", [("sd15", 16), ("sd21", 16), ("sd21-v", 16), ("sdxl", 70)])
def test_preset_shapes(base, blocks):
    """Full-size presets on the meta device: E_r has N*256+1 tokens and every block keeps y's shape."""
    config = IDAdapterConfig.for_base(base)
    with torch.device("meta"):
        adapter = IDAdapter(config)
        patches = torch.empty(2, 4, 256, 1280)
        faces = torch.empty(2, 4, 512)
        image_embeds = torch.empty(2, 4, 1024)
        embeds = adapter.encode(patches, faces, image_embeds)
        assert embeds.reference_tokens.shape == (2, 4 * 256 + 1, 1024) == (2, config.num_ref_tokens, 1024)
        assert {k: tuple(v.shape) for k, v in embeds.identity_tokens.items()} == {
            k: (2, w) for k, w in config.layout.text_widths.items()
        }
        assert len(adapter.blocks) == blocks == len(adapter.cross_kv)
        refs = adapter.blocks.reference_kv(embeds.reference_tokens)
        for block, channels, ref in zip(adapter.blocks, config.layout.block_channels, refs):
            y = torch.empty(4, 64, channels)  # CFG doubles the batch
            assert block(y, ref).shape == y.shape
            assert ref.key.shape == (2, 1025, channels)


def test_sd21_trainable_parameters_match_paper():
    counts = count_trainable_parameters(IDAdapterConfig.for_base("sd21"))
    print({k: f"{v / 1e6:.2f}M" for k, v in counts.items()})
    assert abs(counts["total"] - 262e6) / 262e6 < 0.05
    # cross-attention W_K + W_V of SD2.1: 2 * 1024 * sum(C) (DESIGN.md §2.9)
    assert counts["cross_kv"] == 2 * 1024 * sum(PRESETS["sd21"].block_channels)


@pytest.mark.parametrize("num_refs", [1, 3, 5])
def test_mff_any_number_of_references(num_refs):
    torch.manual_seed(0)
    mff = MixedFacialFeatures(TINY_MFF)
    out = mff(torch.randn(2, num_refs, 4, 16), torch.randn(2, num_refs, 8))
    assert out.shape == (2, num_refs * 4 + 1, 20)


def test_mff_learned_queries_compress_tokens():
    torch.manual_seed(0)
    config = MFFConfig(clip_dim=16, face_dim=8, num_patches=4, width=20, heads=4, num_queries=6)
    out = MixedFacialFeatures(config)(torch.randn(2, 3, 4, 16), torch.randn(2, 3, 8))
    assert out.shape == (2, 6, 20) and config.num_ref_tokens(3) == 6


def test_mff_uses_mean_face_embedding_and_ignores_reference_order():
    torch.manual_seed(0)
    mff = MixedFacialFeatures(TINY_MFF).eval()
    patches, faces = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 8)
    out = mff(patches, faces)
    perm = torch.tensor([2, 0, 1])
    out_perm = mff(patches[:, perm], faces[:, perm])
    # the face token (last) sees the same set of tokens whatever the order of the references
    torch.testing.assert_close(out[:, -1], out_perm[:, -1], rtol=1e-5, atol=1e-5)


def test_queries_from_visual_tokens_equal_gligen_concat_form():
    torch.manual_seed(0)
    block = GatedSelfAttention(channels=32, context_dim=20, heads=4)
    with torch.no_grad():
        block.alpha_attn.fill_(0.5)
        block.alpha_dense.fill_(0.3)
    y, e_r = torch.randn(3, 10, 32), torch.randn(1, 7, 20)
    fast = block(y, block.reference_kv(e_r), weight=0.8)
    reference = gligen_forward(block, y, e_r, weight=0.8)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_closed_gates_and_zero_weight_leave_tokens_unchanged():
    torch.manual_seed(0)
    block = GatedSelfAttention(channels=32, context_dim=20, heads=4)
    y, e_r = torch.randn(2, 10, 32), torch.randn(2, 7, 20)
    ref = block.reference_kv(e_r)
    assert torch.equal(block(y, ref), y)  # gates initialised to 0
    with torch.no_grad():
        block.alpha_attn.fill_(1.0)
    assert not torch.equal(block(y, ref), y)
    assert torch.equal(block(y, ref, weight=0.0), y)


def test_reference_batch_is_tiled_over_cfg_chunks():
    torch.manual_seed(0)
    block = GatedSelfAttention(channels=32, context_dim=20, heads=4)
    with torch.no_grad():
        block.alpha_attn.fill_(1.0)
    y = torch.randn(2, 10, 32)
    e_r = torch.randn(2, 7, 20)
    both = block(torch.cat([y, y]), block.reference_kv(e_r))  # [cond chunk, uncond chunk]
    torch.testing.assert_close(both[:2], both[2:])
    with pytest.raises(ValueError, match="cannot match 2 identity embeddings to a batch of 3"):
        block(torch.randn(3, 10, 32), block.reference_kv(e_r))


def test_identity_prompt_template_and_splice():
    assert format_identity_prompt("a photo of a man in the snow, ", "man", "sks") == "a photo of a man in the snow, man is sks"
    assert format_identity_prompt("", "woman", "sks") == "woman is sks"
    embeds = torch.zeros(2, 5, 3)
    ids = torch.tensor([[1, 2, 9, 4, 5], [1, 9, 3, 4, 5]])
    e_c = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = splice_identity_token(embeds, ids, trigger_id=9, identity_embed=e_c)
    assert torch.equal(out[0, 2], e_c[0]) and torch.equal(out[1, 1], e_c[1])
    assert out.abs().sum() == e_c.sum()
    with pytest.raises(ValueError, match="no trigger token"):
        splice_identity_token(embeds, ids, trigger_id=7, identity_embed=e_c)


def test_identity_mlp_one_head_per_text_encoder():
    layout = UNetLayout("custom", (32,), (4,), 24, {"l": 10, "g": 14})
    adapter = tiny_adapter(layout)
    _, _, image_embeds = tiny_features(adapter.config, batch=3)
    e_c = adapter.id_token(image_embeds)
    assert {k: tuple(v.shape) for k, v in e_c.items()} == {"g": (3, 14), "l": (3, 10)}


def test_layout_needs_one_head_count_per_block():
    with pytest.raises(ValueError, match="one entry per transformer block"):
        UNetLayout("custom", (32, 64), (4,), 24)


def test_config_json_round_trip():
    config = tiny_config(PRESETS["sdxl"], class_word="woman")
    assert IDAdapterConfig.from_json(config.to_json()) == config


def test_features_from_other_face_or_clip_models_are_refused():
    from idadapter_core import IncompatibleWeightsError

    adapter = tiny_adapter(PRESETS["sd15"], face_model="antelopev2", clip_vision="ViT-H-14")
    patches, faces, image_embeds = tiny_features(adapter.config)
    with pytest.raises(IncompatibleWeightsError, match="face embeddings are 128-d.*trained on 8-d embeddings from 'antelopev2'"):
        adapter.encode(patches, torch.randn(1, 2, 128), image_embeds)
    with pytest.raises(IncompatibleWeightsError, match="CLIP vision features.*load 'ViT-H-14' in Load CLIP Vision"):
        adapter.encode(torch.randn(1, 2, 4, 1024), faces, image_embeds)


def test_root_package_imports_without_comfyui():
    """ComfyUI's entry module must import anywhere; the node modules (which need the host) load only on demand.
    Checked in a fresh interpreter, since other tests may have imported the host already."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(REPO_ROOT / '__init__.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert callable(module.comfy_entrypoint)\n"
        "assert 'comfy_api' not in sys.modules and 'comfy' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunked_feed_forward_is_exact_and_trains(monkeypatch):
    import idadapter_core.idadapter.adapter as adapter_module

    torch.manual_seed(0)
    block = GatedSelfAttention(channels=16, context_dim=20, heads=2)
    with torch.no_grad():
        block.alpha_attn.fill_(0.5)
        block.alpha_dense.fill_(0.3)
    y = torch.randn(2, 1500, 16, requires_grad=True)  # 3000 rows: two chunks
    with torch.no_grad():
        ref = block.reference_kv(torch.randn(1, 7, 20))
    chunked = block(y, ref)
    chunked.sum().backward()
    grad_chunked = y.grad.clone()
    y.grad = None
    monkeypatch.setattr(adapter_module, "FF_CHUNK_ROWS", 10**9)
    whole = block(y, ref)
    whole.sum().backward()
    assert torch.equal(chunked, whole)
    torch.testing.assert_close(grad_chunked, y.grad)


def test_one_place_names_a_unet_for_both_hosts():
    """sd21 and sd21-v share their blocks: the prediction type tells them apart; an unknown UNet is named as asked."""
    from idadapter_core import identify_layout, match_preset

    sd21 = PRESETS["sd21"]
    args = (sd21.block_channels, sd21.block_heads, sd21.context_dim)
    assert identify_layout(*args) is sd21
    assert identify_layout(*args, prediction="v_prediction") is PRESETS["sd21-v"]
    assert match_preset(PRESETS["sdxl"]) is PRESETS["sdxl"]
    custom = identify_layout((32, 64), (2, 4), 48, unknown_base="TinyModel")
    assert (custom.base, custom.text_widths, custom.prediction) == ("TinyModel", {"l": 48}, "epsilon")
