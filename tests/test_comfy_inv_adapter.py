"""Inv-Adapter nodes inside a real ComfyUI (imported from COMFYUI_PATH; skipped without it)."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch

from comfy_fixtures import (
    check_pickled_weights_are_listed_and_refused, comfy_model_tree, diffusers_twin, model_hash, write_inv_adapter,
)
from idadapter_core.presets import UNetLayout

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def host(comfy_pack, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_inv_models")
    model, clip, vae = comfy_model_tree(root, "inv_adapter")
    write_inv_adapter(root / "inv_adapter" / "trained.safetensors")
    write_inv_adapter(root / "inv_adapter" / "untrained.safetensors", trained=False)
    write_inv_adapter(root / "inv_adapter" / "wrong-base.safetensors", UNetLayout("custom", (320, 640), (8, 8), 768))
    nodes = importlib.import_module("comfyui_idadapter.nodes.inv_adapter_nodes")
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 64, 64, 3, generator=g)
    reference = nodes.InvertReference.execute(model, vae, clip, image, 4).result[0]
    return dict(model=model, clip=clip, vae=vae, nodes=nodes, root=root, image=image, reference=reference)


def load(host, name):
    return host["nodes"].LoadInvAdapter.execute(name).result[0]


def apply(host, adapter, weight=1.0, start_at=0.0, end_at=1.0, model=None, reference=None, **options):
    return host["nodes"].ApplyInvAdapter.execute(
        model or host["model"], adapter, reference or host["reference"], weight, start_at, end_at, **options
    ).result[0]


def sample(model, clip, seed=0, batch=1, steps=2, cfg=7.0):
    import comfy.sample

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a man"))
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(batch, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", cond, uncond, latent, seed=seed,
                               disable_pbar=True)


def invert(host, model, image=None, steps=4):
    return host["nodes"].InvertReference.execute(model, host["vae"], host["clip"], host["image"] if image is None
                                                 else image, steps).result[0]


def test_inversion_walks_the_noise_levels_up_and_keeps_the_null_prompt(host):
    reference = host["reference"]
    assert reference.latents.shape == (5, 1, 4, 8, 8)
    assert torch.all(reference.sigmas[1:] > reference.sigmas[:-1])
    assert reference.conditioning["c_crossattn"].shape == (1, 77, 768)
    assert reference.model_key.startswith("SD15:") or reference.model_key.split(":")[0] in ("sd15", "SD15")
    # later points are noisier: their spread grows with sigma
    spread = reference.latents.flatten(1).std(dim=1)
    assert spread[-1] > spread[0]


def test_apply_returns_a_patched_clone_and_untrained_or_weight_zero_change_nothing(host):
    model = host["model"]
    before = model_hash(model)
    bare = sample(model, host["clip"])
    assert torch.equal(sample(apply(host, load(host, "untrained.safetensors")), host["clip"]), bare)
    trained = load(host, "trained.safetensors")
    assert torch.equal(sample(apply(host, trained, weight=0.0), host["clip"]), bare)
    assert torch.equal(sample(apply(host, trained, start_at=1.0, end_at=1.0), host["clip"]), bare)
    patched = apply(host, trained)
    assert patched is not model
    assert (sample(patched, host["clip"]) - bare).abs().max() > 1e-3
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    assert model_hash(model) == before and "patches_replace" not in model.model_options["transformer_options"]
    assert trained.patcher in patched.model_patches_models()


def test_reference_pass_runs_once_per_step_for_both_cfg_halves_and_is_cached(host):
    adapter = load(host, "trained.safetensors")
    patched = apply(host, adapter)
    assert patched.wrappers["apply_model"]["idadapter_inv_adapter"]
    unet_calls = []
    unet = host["model"].model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda m, args, kwargs: unet_calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        sample(patched, host["clip"], batch=3, steps=3)
        first = list(unet_calls)
        unet_calls.clear()
        sample(patched, host["clip"], batch=3, steps=3)
    finally:
        handle.remove()
    assert first == [1, 6] * 3  # reference pass (batch 1), then cond + uncond of 3 images in one batch
    assert unet_calls == [6] * 3  # second generation: the cached reference features skip the reference pass


@pytest.mark.parametrize("blocks", ["all", "skip highest resolution"])
def test_parity_with_the_diffusers_binding(host, blocks):
    """Same weights, same reference features: ComfyUI's attention replaces equal the diffusers processors, in every
    block and in the faster mode's blocks (what the identity miniature measures that mode with)."""
    import comfy.model_management

    from idadapter_core.hosts import DiffusersInvAdapter, layout_from_diffusers_unet
    from idadapter_core.inv_adapter import load_inv_adapter
    from idadapter_core.schedule import adapter_blocks

    model = host["model"]
    comfy.model_management.load_models_gpu([model])
    comfy_unet = model.model.diffusion_model
    twin = diffusers_twin(comfy_unet, model.model.model_config.unet_config, block_out_channels=(320, 640),
                          cross_attention_dim=768, attention_head_dim=8)
    adapter = load(host, "trained.safetensors")
    patched = apply(host, adapter, blocks=blocks)
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn1"][("input", 1, 0)].patch.patch
    g = torch.Generator().manual_seed(5)
    x, ref, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([600.0, 600.0])
    options = patched.model_options["transformer_options"]
    with torch.no_grad():
        features = patch.recorded_features(lambda patches: comfy_unet(ref, t[:1], context[:1], transformer_options={"patches": patches}))
        patch.bank.references = patch.references_of(features)
        ours = comfy_unet(x, t, context, transformer_options={"patches_replace": options["patches_replace"]})
        patch.bank.references = None
        bare = comfy_unet(x, t, context, transformer_options={})
    path = host["root"] / "inv_adapter" / "trained.safetensors"
    with torch.no_grad(), DiffusersInvAdapter(twin, load_inv_adapter(path, require_known_base=False)) as binding:
        binding.set_reference(binding.record_reference(ref, t[:1], context[:1]))
        binding.blocks = adapter_blocks(layout_from_diffusers_unet(twin), blocks)
        theirs = twin(x, t, encoder_hidden_states=context).sample
    assert (ours - bare).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused_with_clear_messages(host):
    errors = importlib.import_module("comfyui_idadapter.idadapter_core.errors")  # the classes the pack raises

    with pytest.raises(errors.IncompatibleWeightsError, match="wrong-base.safetensors is for custom"):
        apply(host, load(host, "wrong-base.safetensors"))
    reference = host["nodes"].InvertReference.execute(host["model"], host["vae"], host["clip"], host["image"], 2).result[0]
    reference.model_key = "sd15:0123456789ab"
    with pytest.raises(errors.IncompatibleWeightsError, match="inverted with another checkpoint"):
        apply(host, load(host, "trained.safetensors"), reference=reference)
    # ComfyUI checks the ranges (no validate_inputs turns them off); what it cannot check is refused by Apply
    assert "validate_inputs" not in vars(host["nodes"].ApplyInvAdapter)
    trained = load(host, "trained.safetensors")
    for weight, start_at, end_at, message in ((float("nan"), 0.0, 1.0, "weight is nan"),
                                              (1.0, float("nan"), 1.0, "start_at is nan"),
                                              (1.0, 0.8, 0.2, r"start_at \(0.8\) is after end_at \(0.2\)")):
        with pytest.raises(errors.IDAdapterError, match=message):
            apply(host, trained, weight, start_at, end_at)
    binding = importlib.import_module("comfyui_idadapter.nodes.inv_adapter_binding")
    with pytest.raises(errors.IDAdapterError, match="crop_scale is nan"):  # before any face model runs
        binding.crop_reference_face(host["image"], analyzer=None, size=512, scale=float("nan"))


def test_pickled_weights_are_listed_and_refused_with_the_reason(host):
    check_pickled_weights_are_listed_and_refused(
        host["root"] / "inv_adapter", "legacy.pt", lambda name: load(host, name),
        r"legacy.pt is a PyTorch zip checkpoint, not safetensors",
    )


def test_face_crop_with_the_real_face_model_and_no_face_error(host):
    from conftest import shared_assets_or_skip

    face = importlib.import_module("comfyui_idadapter.idadapter_core.face")
    errors = importlib.import_module("comfyui_idadapter.idadapter_core.errors")

    assets = shared_assets_or_skip()
    analyzer = face.load_face_analyzer(assets / "insightface", "standin_scrfd_mbf128", det_size=640)
    photo = torch.from_numpy(face.load_image(assets / "faces" / "obama.jpg").copy()).float()[None] / 255.0
    from comfyui_idadapter.nodes.inv_adapter_binding import crop_reference_face

    crop = crop_reference_face(photo, analyzer, 128, 2.0)
    assert crop.shape == (1, 128, 128, 3)
    with pytest.raises(errors.IDAdapterError, match="reference image 1/1: no face found"):
        crop_reference_face(torch.full((1, 64, 64, 3), 0.5), analyzer, 128, 2.0)
    assert np.isfinite(crop.numpy()).all()


LORA_TARGET = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"


def with_lora(host, strength=1.0):
    """The MODEL through ComfyUI's LoRA loading (comfy.sd.load_lora_for_models, what Load LoRA runs) with a rank-4
    LoRA on one cross-attention key projection."""
    import comfy.sd

    g = torch.Generator().manual_seed(7)
    prefix = f"lora_unet_{LORA_TARGET.replace('.', '_')}"
    lora = {f"{prefix}.lora_up.weight": torch.randn(320, 4, generator=g),
            f"{prefix}.lora_down.weight": torch.randn(4, 768, generator=g), f"{prefix}.alpha": torch.tensor(4.0)}
    model, _ = comfy.sd.load_lora_for_models(host["model"], None, lora, strength, 0.0)
    assert list(model.patches) == [f"diffusion_model.{LORA_TARGET}.weight"]
    return model


def merged(host):
    """ModelMergeAdd(model, model): every UNet weight patched (doubled)."""
    merging = importlib.import_module("comfy_extras.nodes_model_merging")
    return merging.ModelAdd().merge(host["model"], host["model"])[0]


@pytest.mark.parametrize("patch", [with_lora, merged], ids=["lora", "merge"])
def test_a_reference_is_refused_on_the_model_with_other_weight_patches_both_ways(host, patch):
    errors = importlib.import_module("comfyui_idadapter.idadapter_core.errors")
    adapter = load(host, "trained.safetensors")
    patched = patch(host)
    with pytest.raises(errors.IncompatibleWeightsError, match=r"inverted with the plain checkpoint, but it is applied "
                       r"to one with weight patches \(LoRA or merge: patches:\d+:\w+\).*after the same LoRAs and merges"):
        apply(host, adapter, model=patched)
    through_patched = invert(host, patched, steps=2)
    with pytest.raises(errors.IncompatibleWeightsError, match=r"inverted with a model with weight patches \(LoRA or "
                       r"merge: patches:\d+:\w+\), but it is applied to the plain checkpoint"):
        apply(host, adapter, reference=through_patched)
    # the same LoRA or merge made again (a new ModelPatcher, a new patches_uuid) is the same model
    again = patch(host)
    assert again.patches_uuid != patched.patches_uuid
    assert torch.isfinite(sample(apply(host, adapter, model=again, reference=through_patched), host["clip"], steps=1)).all()


def test_a_lora_at_another_strength_is_another_model(host):
    errors = importlib.import_module("comfyui_idadapter.idadapter_core.errors")
    reference = invert(host, with_lora(host, 1.0), steps=2)
    with pytest.raises(errors.IncompatibleWeightsError, match="the same checkpoint with other weight patches"):
        apply(host, load(host, "trained.safetensors"), model=with_lora(host, 0.5), reference=reference)


def test_the_model_key_is_the_same_while_patches_sit_in_the_loaded_weights(host):
    """Sampling adds a MODEL's patches to the weights in place (the originals kept in the patcher's backup): the key of
    the plain and of the merged model must not change with which of them is loaded."""
    import comfy.model_management

    binding = importlib.import_module("comfyui_idadapter.nodes.inv_adapter_binding")
    model, doubled = host["model"], merged(host)
    keys = binding.model_key(model), binding.model_key(doubled)
    assert keys[0] != keys[1] and keys[1].startswith(keys[0] + "+patches:")
    comfy.model_management.load_models_gpu([doubled])
    first_conv = doubled.model.diffusion_model.input_blocks[0][0].weight
    assert torch.equal(first_conv, 2 * doubled.backup[binding.FIRST_CONV].weight)  # the weights are patched now
    assert (binding.model_key(model), binding.model_key(doubled)) == keys
    comfy.model_management.load_models_gpu([model])
    assert (binding.model_key(model), binding.model_key(doubled)) == keys


def test_a_batch_of_reference_images_gives_the_eaa_every_reference_as_more_tokens(host):
    """Two photos of one person: the reference pass runs both, and every block's EAA attends to the features of both
    (2 x 64 tokens in the first block); the order of the photos does not matter. Latent batches 1-3, and cfg 1."""
    adapter = load(host, "trained.safetensors")
    second = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    pair = invert(host, host["model"], torch.cat([host["image"], second]))
    assert pair.latents.shape == (5, 2, 4, 8, 8)
    torch.testing.assert_close(pair.latents[:, :1], host["reference"].latents, rtol=1e-3, atol=1e-3)  # as alone
    clip = host["clip"]
    for batch, cfg in ((2, 7.0), (3, 7.0), (1, 1.0)):
        patched = apply(host, adapter, reference=pair)
        assert torch.isfinite(sample(patched, clip, batch=batch, steps=1, cfg=cfg)).all(), (batch, cfg)
        patch = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).patch.patch
        (features,) = patch._features.values()
        assert features[0].shape == (1, 2 * 64, 320)
    both, one = sample(apply(host, adapter, reference=pair), clip), sample(apply(host, adapter), clip)
    swapped = sample(apply(host, adapter, reference=dataclasses.replace(pair, latents=pair.latents.flip(1))), clip)
    # the order only changes float rounding (the reference pass batches the photos the other way round)
    assert (swapped - both).abs().max() < 0.02 * (both - one).abs().max()
