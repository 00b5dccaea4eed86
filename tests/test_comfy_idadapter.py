"""IDAdapter nodes inside a real ComfyUI (imported from COMFYUI_PATH; skipped without it)."""
from __future__ import annotations

import asyncio
import importlib

import pytest
import torch

from comfy_fixtures import (
    TINY_SD15_LAYOUT, check_pickled_weights_are_listed_and_refused, comfy_model_tree, diffusers_twin, fake_features,
    model_hash, tiny_adapter_config, write_adapter,
)
from idadapter_core import IdentityEmbeds
from idadapter_core.presets import UNetLayout

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def host(comfy_pack, tmp_path_factory):
    """ComfyUI with its model folders pointed at a temporary tree holding a tiny SD1.5 checkpoint and adapters."""
    root = tmp_path_factory.mktemp("comfy_models")
    model, clip, vae = comfy_model_tree(root, "idadapter")
    write_adapter(root / "idadapter" / "tiny.safetensors", tiny_adapter_config(), seed=0, kv_scale=0.02)
    write_adapter(root / "idadapter" / "closed.safetensors", tiny_adapter_config(), seed=0, open_gates=False)
    write_adapter(root / "idadapter" / "kv-only.safetensors", tiny_adapter_config(), seed=0, open_gates=False, kv_scale=0.05)
    write_adapter(root / "idadapter" / "other.safetensors", tiny_adapter_config(), seed=1)
    wrong_layout = UNetLayout("custom", (320, 640), (8, 8), 768, {"l": 768})
    write_adapter(root / "idadapter" / "wrong-base.safetensors", tiny_adapter_config(wrong_layout))
    h_clip = UNetLayout("sd21-like", TINY_SD15_LAYOUT.block_channels, TINY_SD15_LAYOUT.block_heads, 768, {"h": 1024})
    write_adapter(root / "idadapter" / "h-clip.safetensors", tiny_adapter_config(h_clip))
    nodes = importlib.import_module("comfyui_idadapter.nodes.idadapter_nodes")
    return dict(model=model, clip=clip, vae=vae, nodes=nodes, root=root)


def load(host, name):
    return host["nodes"].LoadIDAdapter.execute(name).result[0]


def encode(host, adapter, seed=0) -> IdentityEmbeds:
    return host["nodes"].EncodeIdentity.execute(adapter, fake_features(adapter.config, seed)).result[0]


def apply(host, adapter, embeds, weight=1.0, start_at=0.0, end_at=1.0, model=None, **options):
    return host["nodes"].ApplyIDAdapter.execute(
        model or host["model"], adapter, embeds, weight, start_at, end_at, **options
    ).result[0]


def sample(model, clip, seed=0, batch=1, steps=2, denoised=None):
    """Euler samples; `denoised` (a list) receives each step's x0 prediction."""
    import comfy.sample

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a man"))
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(batch, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    callback = None if denoised is None else (lambda step, x0, x, total: denoised.append(x0.clone()))
    return comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", cond, uncond, latent, seed=seed,
                               callback=callback, disable_pbar=True)


def with_static_kv_patches(model, adapter, strength):
    """The K/V differences as ComfyUI weight patches at a fixed strength: the reference for the dynamic path."""
    binding = importlib.import_module("comfyui_idadapter.nodes.comfy_binding")
    blocks = binding.describe_unet(model.get_model_object("diffusion_model"))
    patched = model.clone()
    patches = {}
    for name, kv in zip(blocks.block_names, adapter.model.cross_kv):
        patches[f"{name}.attn2.to_k.weight"] = ("diff", (kv.to_k.diff.detach(),))
        patches[f"{name}.attn2.to_v.weight"] = ("diff", (kv.to_v.diff.detach(),))
    assert len(patched.add_patches(patches, strength)) == len(patches)
    return patched


def test_apply_returns_a_patched_clone_and_leaves_the_input_model_untouched(host):
    model = host["model"]
    before = model_hash(model)
    options_before = repr(model.model_options)
    adapter = load(host, "tiny.safetensors")
    patched = apply(host, adapter, encode(host, adapter))
    options = patched.model_options["transformer_options"]
    assert patched is not model and "middle_patch" in options["patches"]
    # the K/V differences ride in every block's attn2 replace patch, never in the shared weights
    assert patched.patches == {} and len(options["patches_replace"]["attn2"]) == len(TINY_SD15_LAYOUT.block_channels)
    sample(patched, host["clip"])
    # ComfyUI patches the shared weights while the clone is loaded and restores them when another model loads
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    assert model_hash(model) == before and repr(model.model_options) == options_before
    assert adapter.patcher in patched.model_patches_models()


def test_graph_without_the_node_is_unchanged_and_closed_gates_change_nothing(host):
    bare = sample(host["model"], host["clip"])
    adapter = load(host, "closed.safetensors")
    assert torch.equal(sample(apply(host, adapter, encode(host, adapter)), host["clip"]), bare)
    assert torch.equal(sample(host["model"], host["clip"]), bare)


def test_adapter_changes_the_image_and_weight_zero_does_not(host):
    bare = sample(host["model"], host["clip"])
    adapter = load(host, "other.safetensors")  # open gates, no K/V deltas
    embeds = encode(host, adapter)
    assert (sample(apply(host, adapter, embeds), host["clip"]) - bare).abs().max() > 1e-3
    assert torch.equal(sample(apply(host, adapter, embeds, weight=0.0), host["clip"]), bare)


def test_weight_zero_and_an_empty_window_turn_everything_off_trained_kv_included(host):
    bare = sample(host["model"], host["clip"])
    adapter = load(host, "tiny.safetensors")  # open gates and non-zero K/V differences
    embeds = encode(host, adapter)
    assert (sample(apply(host, adapter, embeds), host["clip"]) - bare).abs().max() > 1e-3
    assert torch.equal(sample(apply(host, adapter, embeds, weight=0.0), host["clip"]), bare)
    assert torch.equal(sample(apply(host, adapter, embeds, end_at=0.0), host["clip"]), bare)
    kv_only = load(host, "kv-only.safetensors")
    assert torch.equal(sample(apply(host, kv_only, encode(host, kv_only), weight=0.0), host["clip"]), bare)


def test_steps_before_start_are_the_unpatched_models_steps(host):
    import comfy.samplers

    adapter = load(host, "tiny.safetensors")
    patched = apply(host, adapter, encode(host, adapter), start_at=0.5)
    bare_steps, patched_steps = [], []
    sample(host["model"], host["clip"], steps=4, denoised=bare_steps)
    sample(patched, host["clip"], steps=4, denoised=patched_steps)
    model_sampling = host["model"].get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "normal", 4)[:-1]
    outside = int((sigmas > model_sampling.percent_to_sigma(0.5)).sum())
    assert 0 < outside < 4
    for step in range(outside):
        assert torch.equal(patched_steps[step], bare_steps[step]), step
    assert (patched_steps[outside] - bare_steps[outside]).abs().max() > 1e-4


def model_output(model, sigma: float) -> torch.Tensor:
    """One CFG-batched model call at noise level `sigma`, with the transformer options a sampler would pass."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    sigmas = torch.full((2,), sigma)
    options = {**model.model_options["transformer_options"], "sigmas": sigmas}
    with torch.no_grad():
        return model.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=options)


def test_steps_after_end_are_the_unpatched_models_steps(host):
    adapter = load(host, "tiny.safetensors")
    patched = apply(host, adapter, encode(host, adapter), end_at=0.5)
    sigma_end = host["model"].get_model_object("model_sampling").percent_to_sigma(0.5)
    assert torch.equal(model_output(patched, sigma_end * 0.5), model_output(host["model"], sigma_end * 0.5))
    assert (model_output(patched, sigma_end * 2) - model_output(host["model"], sigma_end * 2)).abs().max() > 1e-4


@pytest.mark.parametrize("weight,mode,static_strength", [
    (0.5, "scaled by weight", 0.5),
    (-0.7, "scaled by weight", -0.7),
    (0.0, "full strength (paper)", 1.0),
    (0.3, "full strength (paper)", 1.0),
])
def test_weight_scales_the_trained_kv_like_a_weight_patch_unless_in_the_paper_form(host, weight, mode, static_strength):
    """Closed gates, so only the K/V differences act: W + s·ΔW, s = weight, or 1 in the paper's form."""
    adapter = load(host, "kv-only.safetensors")
    ours = model_output(apply(host, adapter, encode(host, adapter), weight=weight, cross_attention_kv=mode), 5.0)
    reference = model_output(with_static_kv_patches(host["model"], adapter, static_strength), 5.0)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert (ours - model_output(host["model"], 5.0)).abs().max() > 1e-2


class OtherPacksReplace:
    """Another pack's attn2 replace patch (IPAdapter-style): counts its calls, then attends as ComfyUI would."""

    def __init__(self) -> None:
        import comfy.model_patcher

        self.calls = 0
        self.patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        self.calls += 1
        return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))

    def models(self):
        return [self.patcher]


def test_apply_chains_the_replace_patches_already_there(host):
    binding = importlib.import_module("comfyui_idadapter.nodes.comfy_binding")
    blocks = binding.describe_unet(host["model"].get_model_object("diffusion_model"))
    other = host["model"].clone()
    by_index, by_block = OtherPacksReplace(), OtherPacksReplace()
    name, number, depth = blocks.replace_keys[0]
    other.set_model_attn2_replace(by_index, name, number, depth)  # keyed (name, number, depth)
    name, number, _ = blocks.replace_keys[-1]
    other.set_model_attn2_replace(by_block, name, number)  # keyed (name, number): ComfyUI's fallback key
    adapter = load(host, "kv-only.safetensors")
    patched = apply(host, adapter, encode(host, adapter), model=other)
    # theirs as the patched MODEL holds them (ComfyUI before v0.14.0 deep-copies other packs' patches at each clone)
    replaces = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    theirs = [replaces[blocks.replace_keys[0]].inner, replaces[blocks.replace_keys[-1]].inner]
    assert all(isinstance(patch, OtherPacksReplace) for patch in theirs)
    assert {theirs[0].patcher, theirs[1].patcher, adapter.patcher} <= set(patched.model_patches_models())
    ours = model_output(patched, 5.0)
    assert [patch.calls for patch in theirs] == [1, 1]  # theirs still run, on our K/V
    torch.testing.assert_close(ours, model_output(with_static_kv_patches(host["model"], adapter, 1.0), 5.0),
                               rtol=1e-4, atol=1e-4)


def test_faster_mode_runs_the_adapter_in_fewer_blocks(host):
    adapter = load(host, "other.safetensors")
    calls, handles = count_adapter_calls(adapter)
    try:
        sample(apply(host, adapter, encode(host, adapter), blocks="skip highest resolution"), host["clip"], steps=1)
    finally:
        for h in handles:
            h.remove()
    narrow = [i for i, c in enumerate(TINY_SD15_LAYOUT.block_channels) if c == 320]
    assert calls == [i for i in range(len(TINY_SD15_LAYOUT.block_channels)) if i not in narrow]


@pytest.mark.parametrize("weight,start_at,end_at,expected", [
    (float("nan"), 0.0, 1.0, "weight is nan"),
    (1.0, float("nan"), 1.0, "start_at is nan"),
    (1.0, 0.8, 0.2, r"start_at \(0.8\) is after end_at \(0.2\)"),
])
def test_apply_refuses_what_comfyui_range_checks_cannot(host, weight, start_at, end_at, expected):
    adapter = load(host, "tiny.safetensors")
    with pytest.raises(Exception, match=expected):
        apply(host, adapter, encode(host, adapter), weight=weight, start_at=start_at, end_at=end_at)


def count_adapter_calls(adapter):
    calls = []
    handles = [block.ff.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, block in enumerate(adapter.model.blocks)]
    return calls, handles


def test_every_transformer_block_runs_the_adapter_middle_included(host):
    adapter = load(host, "other.safetensors")
    calls, handles = count_adapter_calls(adapter)
    try:
        sample(apply(host, adapter, encode(host, adapter)), host["clip"], steps=2)
    finally:
        for h in handles:
            h.remove()
    num_blocks = len(TINY_SD15_LAYOUT.block_channels)
    assert calls == list(range(num_blocks)) * 2  # forward order, once per UNet call (cond+uncond in one batch)
    assert 2 in calls  # block 2 is the middle block's transformer


def test_start_and_end_limit_the_steps_that_use_the_adapter(host):
    adapter = load(host, "other.safetensors")
    embeds = encode(host, adapter)
    calls, handles = count_adapter_calls(adapter)
    try:
        sample(apply(host, adapter, embeds, start_at=0.5, end_at=1.0), host["clip"], steps=4)
    finally:
        for h in handles:
            h.remove()
    num_blocks = len(TINY_SD15_LAYOUT.block_channels)
    assert 0 < len(calls) < 4 * num_blocks and len(calls) % num_blocks == 0


def test_batch_of_several_latents(host):
    adapter = load(host, "other.safetensors")
    out = sample(apply(host, adapter, encode(host, adapter)), host["clip"], batch=3)
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()


def test_weights_for_another_unet_are_refused_naming_both(host):
    adapter = load(host, "wrong-base.safetensors")
    with pytest.raises(Exception, match=r"wrong-base.safetensors is for custom \(context 768, 2 transformer blocks\), but the model is SD15 \(context 768, 7"):
        apply(host, adapter, encode(host, adapter))


def test_id_embeds_from_other_weights_are_refused(host):
    tiny, other = load(host, "tiny.safetensors"), load(host, "other.safetensors")
    with pytest.raises(Exception, match="encoded with 'other.safetensors', not with 'tiny.safetensors'"):
        apply(host, tiny, encode(host, other))


def test_identity_prompt_replaces_the_trigger_token_input_embedding(host):
    nodes, clip = host["nodes"], host["clip"]
    adapter = load(host, "tiny.safetensors")
    embeds = encode(host, adapter)
    cond = nodes.IdentityPrompt.execute(clip, adapter, embeds, "a photo", "").result[0][0][0]
    plain = clip.encode_from_tokens_scheduled(clip.tokenize("a photo, man is sks"))[0][0]
    tokens = clip.tokenize("a photo, man is sks")["l"][0]
    trigger = [i for i, t in enumerate(tokens) if t[0] == 48136]
    assert len(trigger) == 1
    i = trigger[0]
    # CLIP's text transformer is causal: positions before the trigger are untouched, the trigger's changes
    assert torch.equal(cond[:, :i], plain[:, :i])
    assert (cond[:, i] - plain[:, i]).abs().max() > 1e-4


def test_identity_prompt_refuses_a_clip_of_another_model(host):
    adapter = load(host, "h-clip.safetensors")
    embeds = encode(host, adapter)
    with pytest.raises(Exception, match=r"trained for the text encoder\(s\) \['h'\].*this CLIP has \['l'\]"):
        host["nodes"].IdentityPrompt.execute(host["clip"], adapter, embeds, "a photo", "")


def test_save_and_load_id_embeds(host):
    import folder_paths

    nodes = host["nodes"]
    adapter = load(host, "tiny.safetensors")
    embeds = encode(host, adapter)
    path = nodes.SaveIDEmbeds.execute(embeds, "alice").result[0]
    assert path.startswith(folder_paths.get_output_directory())
    assert "alice.safetensors" in nodes.saved_embeds()
    loaded = nodes.LoadIDEmbeds.execute("alice.safetensors").result[0]
    assert torch.equal(loaded.reference_tokens, embeds.reference_tokens)
    assert torch.equal(sample(apply(host, adapter, loaded), host["clip"]), sample(apply(host, adapter, embeds), host["clip"]))


@pytest.mark.parametrize("name", ["../escape", "sub/alice", "..\\x", "/abs", "C:evil", "", "..", "x" * 250, "x" * 300,
                                  "two\nlines", "tab\there"])
def test_save_name_must_be_a_plain_name_in_the_output_folder(host, name):
    adapter = load(host, "tiny.safetensors")
    with pytest.raises(Exception, match="not a plain file name"):
        host["nodes"].SaveIDEmbeds.execute(encode(host, adapter), name)


def test_save_id_embeds_shows_the_saved_name(host):
    adapter = load(host, "tiny.safetensors")
    output = host["nodes"].SaveIDEmbeds.execute(encode(host, adapter), "bob")
    assert "bob.safetensors" in output.ui.as_dict()["text"][0]


def test_weights_with_nan_or_inf_are_refused_naming_the_tensor(host):
    from idadapter_core import IDAdapter, save_idadapter, save_identity_embeds

    adapter = IDAdapter(tiny_adapter_config())
    with torch.no_grad():
        adapter.blocks[3].attn.to_q.weight[0, 0] = float("nan")
    save_idadapter(host["root"] / "idadapter" / "nan.safetensors", adapter)
    with pytest.raises(Exception, match=r"nan.safetensors has NaN or infinite values in tensor 'blocks.3.attn.to_q.weight'"):
        load(host, "nan.safetensors")
    embeds = encode(host, load(host, "tiny.safetensors"))
    embeds.identity_tokens["l"][0, 5] = float("inf")
    import folder_paths

    save_identity_embeds(folder_paths.get_output_directory() + "/idadapter_embeds/inf.safetensors", embeds)
    with pytest.raises(Exception, match=r"inf.safetensors has NaN or infinite values in tensor 'identity_tokens.l'"):
        host["nodes"].LoadIDEmbeds.execute("inf.safetensors")


def test_pickled_weights_are_listed_and_refused_with_the_reason(host):
    check_pickled_weights_are_listed_and_refused(
        host["root"] / "idadapter", "legacy.bin", lambda name: load(host, name),
        r"legacy.bin is a PyTorch zip checkpoint, not safetensors.*python -m train export",
    )


def test_weights_for_a_layout_of_the_same_name_say_what_differs(host):
    """The model is ComfyUI's SD15 with fewer blocks; weights named for 'SD15' with yet other blocks."""
    same_name = UNetLayout("SD15", (320, 640), (8, 8), 768, {"l": 768})
    write_adapter(host["root"] / "idadapter" / "same-name.safetensors", tiny_adapter_config(same_name))
    adapter = load(host, "same-name.safetensors")
    with pytest.raises(Exception, match=r"2 vs 7 transformer blocks \(widths 320/640 vs 320/640\)") as error:
        apply(host, adapter, encode(host, adapter))
    assert "trained for SD15" not in str(error.value)


def test_patch_object_follows_the_model_patch_protocol(host):
    adapter = load(host, "tiny.safetensors")
    patched = apply(host, adapter, encode(host, adapter))
    patch = patched.model_options["transformer_options"]["patches"]["middle_patch"][0]
    assert patch.to(torch.float16) is patch and patch.to(torch.device("cpu")) is patch
    assert patch.models() == [adapter.patcher]
    patch.cleanup()


def test_parity_with_the_diffusers_binding(host):
    """Same weights, same inputs: the UNet output through ComfyUI's middle_patch equals the diffusers binding's."""
    import comfy.model_management

    from idadapter_core import load_idadapter
    from idadapter_core.hosts import DiffusersIDAdapter

    model = host["model"]
    comfy.model_management.load_models_gpu([model])  # the plain weights (an earlier sampled clone may be loaded)
    comfy_unet = model.model.diffusion_model
    diffusers_unet = diffusers_twin(
        comfy_unet, model.model.model_config.unet_config,
        block_out_channels=(320, 640), cross_attention_dim=768, attention_head_dim=8,
    )

    adapter = load(host, "tiny.safetensors")  # open gates and non-zero cross-attention K/V deltas
    embeds = encode(host, adapter)
    patched = apply(host, adapter, embeds)
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([600.0, 600.0])

    with torch.no_grad():
        bare_comfy = comfy_unet(x, t, context, transformer_options={})
    comfy.model_management.load_models_gpu([patched])
    transformer_options = patched.model_options["transformer_options"]
    options = {"patches": transformer_options["patches"], "patches_replace": transformer_options["patches_replace"]}
    with torch.no_grad():
        ours = comfy_unet(x, t, context, transformer_options=options)
    comfy.model_management.load_models_gpu([model])

    reference = load_idadapter(host["root"] / "idadapter" / "tiny.safetensors", model_layout=adapter.config.layout)
    with torch.no_grad(), DiffusersIDAdapter(diffusers_unet, reference) as binding:
        binding.set_identity(embeds.reference_tokens)
        theirs = diffusers_unet(x, t, encoder_hidden_states=context).sample
    bare_diffusers = diffusers_unet(x, t, encoder_hidden_states=context).sample

    assert (ours - bare_comfy).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(bare_comfy, bare_diffusers, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# An SDXL-like UNet (linear projections, two transformer layers per block at the second level and in the middle),
# so transformer_index (per SpatialTransformer) and block_index (depth inside one) both matter.
DEEP_UNET = dict(
    image_size=32, in_channels=4, model_channels=64, out_channels=4, num_res_blocks=[1, 1], channel_mult=(1, 2),
    num_head_channels=32, use_spatial_transformer=True, transformer_depth=[1, 2], transformer_depth_middle=2,
    transformer_depth_output=[1, 1, 2, 2], context_dim=96, use_linear_in_transformer=True,
)
DEEP_LAYOUT = UNetLayout("custom", (64, 128, 128, 128, 128, 128, 128, 128, 128, 64, 64), (2,) + (4,) * 8 + (2, 2), 96, {"l": 96})


def test_deep_blocks_run_in_forward_order_and_match_diffusers(comfy_pack, tmp_path):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from comfy_fixtures import randomize_
    from idadapter_core import load_idadapter
    from idadapter_core.hosts import DiffusersIDAdapter

    binding = importlib.import_module("comfyui_idadapter.nodes.idadapter_binding")
    host_binding = importlib.import_module("comfyui_idadapter.nodes.comfy_binding")
    comfy_unet = randomize_(UNetModel(**DEEP_UNET, operations=comfy.ops.disable_weight_init), 7).eval()
    blocks = host_binding.describe_unet(comfy_unet)
    assert blocks.layout.same_shape_as(DEEP_LAYOUT)
    assert blocks.first_block == (0, 1, 3, 5, 7, 9, 10)  # 7 SpatialTransformers, depths 1,2,2,2,2,1,1
    path = tmp_path / "deep.safetensors"
    write_adapter(path, tiny_adapter_config(DEEP_LAYOUT))
    adapter = binding.load_idadapter_for_comfy(str(path), "deep.safetensors")
    embeds = encode({"nodes": importlib.import_module("comfyui_idadapter.nodes.idadapter_nodes")}, adapter)
    window = importlib.import_module("comfyui_idadapter.idadapter_core.schedule").StepWindow(float("inf"), 0.0)
    patch = binding.IDAdapterPatch(
        adapter, embeds, 1.0, window, blocks.first_block, frozenset(range(DEEP_LAYOUT.num_blocks))
    )

    calls, handles = count_adapter_calls(adapter)
    g = torch.Generator().manual_seed(11)
    x, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 96, generator=g), torch.tensor([300.0, 300.0])
    with torch.no_grad():
        ours = comfy_unet(x, t, context, transformer_options={"patches": {"middle_patch": [patch]}})
        bare = comfy_unet(x, t, context, transformer_options={})
    for h in handles:
        h.remove()
    assert calls == list(range(DEEP_LAYOUT.num_blocks))

    diffusers_unet = diffusers_twin(
        comfy_unet, DEEP_UNET, block_out_channels=(64, 128), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=96,
    )
    with torch.no_grad(), DiffusersIDAdapter(diffusers_unet, load_idadapter(path, model_layout=DEEP_LAYOUT)) as reference:
        reference.set_identity(embeds.reference_tokens)
        theirs = diffusers_unet(x, t, encoder_hidden_states=context).sample
    assert (ours - bare).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def pack_typed_inputs(comfy_pack) -> list[tuple[type, str, str]]:
    """(node class, input name, socket type) of every input of one of the pack's own socket types, on every node."""
    pack_types = importlib.import_module("comfyui_idadapter.nodes.pack_types")
    nodes = importlib.import_module("comfyui_idadapter.nodes")
    found = []
    for node in asyncio.run(nodes.IDAdapterExtension().get_node_list()):
        found += [(node, socket.id, socket.get_io_type()) for socket in node.define_schema().inputs
                  if socket.get_io_type() in pack_types.PACK_TYPES]
    return found


def test_every_pack_typed_input_refuses_a_value_that_is_not_its_type(comfy_pack):
    """An API prompt can put a file name where a link belongs; every node refuses it naming the input, what came and
    what to connect, before doing any work (the other inputs are not even looked at)."""
    errors = importlib.import_module("comfyui_idadapter.idadapter_core.errors")
    checked = pack_typed_inputs(comfy_pack)
    assert {(node.__name__, name) for node, name, _ in checked} == {
        ("EncodeIdentity", "idadapter"), ("EncodeIdentity", "face_features"), ("ApplyIDAdapter", "idadapter"),
        ("ApplyIDAdapter", "id_embeds"), ("IdentityPrompt", "idadapter"), ("IdentityPrompt", "id_embeds"),
        ("SaveIDEmbeds", "id_embeds"), ("ApplyInvAdapter", "inv_adapter"), ("ApplyInvAdapter", "reference"),
    }
    for node, name, type_name in checked:
        schema = node.define_schema()
        inputs = {socket.id: None for socket in schema.inputs}
        inputs[name] = "accept-inv.safetensors"
        expected = (f"{schema.display_name}: the input '{name}' takes an {type_name}, but it got the text "
                    f"'accept-inv.safetensors'. Connect the {type_name} output of ")
        with pytest.raises(errors.IDAdapterError) as refused:
            node.execute(**inputs)
        assert str(refused.value).startswith(expected), str(refused.value)


def test_an_adapter_of_the_other_method_is_refused_by_name(host, tmp_path):
    from comfy_fixtures import write_inv_adapter

    errors = importlib.import_module("comfyui_idadapter.idadapter_core.errors")
    binding = importlib.import_module("comfyui_idadapter.nodes.comfy_binding")
    inv_adapter = importlib.import_module("comfyui_idadapter.idadapter_core.inv_adapter")
    write_inv_adapter(tmp_path / "inv.safetensors")
    wrong = binding.load_adapter_for_comfy(str(tmp_path / "inv.safetensors"), "inv.safetensors",
                                           inv_adapter.load_inv_adapter)
    embeds = encode(host, load(host, "tiny.safetensors"))
    with pytest.raises(errors.IDAdapterError, match="Apply IDAdapter: the input 'idadapter' takes an IDADAPTER, but it "
                                                    "got an INV_ADAPTER. Connect the IDADAPTER output of Load IDAdapter"):
        host["nodes"].ApplyIDAdapter.execute(host["model"], wrong, embeds, 1.0, 0.0, 1.0)
