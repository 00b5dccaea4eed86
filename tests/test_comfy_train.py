"""The trainer against the ComfyUI nodes (COMFYUI_PATH; skipped without it, and without ../shared/assets where real
photos and the stand-in insightface pack are needed).

Feature parity: the CLIP vision features the trainer computes (`prepare`'s cached 224 crops -> `FrozenFeatures` ->
`clip_encoder_from_transformers`) equal what Load CLIP Vision + Extract Face Features give for the same image and
weights, within `RELATIVE_TOLERANCE`; IDAdapter weights trained on other features would fail silently in ComfyUI.

End to end: `prepare` -> `fit` -> `export` on a base model that is one ComfyUI SD1.5 checkpoint file (the trainer reads
it with diffusers' single-file loader), then the exported file through Load IDAdapter in a graph: Extract Face
Features -> Encode Identity -> Apply IDAdapter + Identity Prompt -> KSampler -> VAE Decode.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_fixtures import (
    comfy_clip_vision_config, comfy_folders, load_clip_vision, write_clip_vision, write_tiny_sd15_checkpoint,
    write_tiny_sd15_config_folder, write_transformers_clip_vision,
)
from conftest import shared_assets_or_skip

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]

FACE_PACK = "standin_scrfd_mbf128"
RELATIVE_TOLERANCE = 1e-4
"""Largest |trainer - ComfyUI| allowed, relative to the largest |ComfyUI| feature: float32 rounding of two attention
implementations (measured on ViT-L/14: 6e-7). A float16 forward of the same weights is off by 6e-3: this catches it."""

# ComfyUI CLIP vision configs it has no JSON for (so no Load CLIP Vision detection), built by its own ClipVisionModel:
# at 224 px like ViT-L/H (the crops go in unresized), at 32 px and at 336 px (ComfyUI resizes the 224 crops, clamps
# and rounds them to 1/255 steps first).
TINY_CLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14, image_size=224,
    projection_dim=24, hidden_act="quick_gelu", layer_norm_eps=1e-5, model_type="clip_vision_model", num_channels=3,
)
TINY_CLIP_VISION_SIZES = {224: 14, 32: 8, 336: 14}
"""image size -> patch size."""


@pytest.fixture(scope="module")
def pack(comfy_pack):
    """The pack as ComfyUI imported it (its own copy of the core), and ComfyUI's own node module."""
    import nodes as comfy_nodes

    return dict(
        face=importlib.import_module("comfyui_idadapter.idadapter_core.face"),
        face_nodes=importlib.import_module("comfyui_idadapter.nodes.face_nodes"),
        idadapter_nodes=importlib.import_module("comfyui_idadapter.nodes.idadapter_nodes"),
        comfy_nodes=comfy_nodes,
    )


def deviation(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """max |ours - reference|, and that relative to max |reference|."""
    largest = float((ours.detach().float() - reference.float()).abs().max())
    return largest, largest / float(reference.float().abs().max())


def assert_same_features(ours: tuple[torch.Tensor, torch.Tensor], comfy: tuple[torch.Tensor, torch.Tensor]) -> None:
    """(patch tokens or hidden states, image embeds) of the trainer vs ComfyUI."""
    for name, a, b in zip(("patch tokens", "image embeds"), ours, comfy):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        absolute, relative = deviation(a, b)
        assert relative <= RELATIVE_TOLERANCE, f"{name}: max deviation {absolute:.3g} ({relative:.3g} of the scale)"


def trainer_clip_model(folder: Path):
    """The CLIP vision model as `fit` loads it (float16 here, as the file is)."""
    from train.models import load_clip_vision as load_trainer_clip_vision

    return load_trainer_clip_vision(folder).model


def synthetic_crops(count: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """(count, size, size, 3) crops as both hosts see them: uint8 pixels as floats in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, size, size, 3), generator=g).float() / 255.0


# ------------------------------------------------------------------------------------------------ feature parity


@pytest.mark.parametrize("image_size", sorted(TINY_CLIP_VISION_SIZES))
def test_crops_resized_for_the_model_give_the_same_features(pack, tmp_path, image_size):
    """ComfyUI's clip_preprocess resizes (bicubic, antialiased), clamps and rounds to 1/255 steps, then normalises;
    the 336 px case overshoots [0, 1] when upscaling, so the clamp matters too."""
    from idadapter_core.hosts.transformers_clip import clip_encoder_from_transformers

    config = dict(TINY_CLIP_VISION, image_size=image_size, patch_size=TINY_CLIP_VISION_SIZES[image_size])
    path = write_clip_vision(tmp_path / "tiny.safetensors", config)
    crops = synthetic_crops(2)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        comfy = pack["face_nodes"].comfy_clip_encoder(load_clip_vision(path, config))(crops)
    trainer_model = trainer_clip_model(write_transformers_clip_vision(tmp_path / "hf", path, config))
    ours = clip_encoder_from_transformers(trainer_model)(crops)
    assert comfy[0].shape == (2, 1 + (image_size // config["patch_size"]) ** 2, 32)
    assert_same_features(ours, comfy)


@pytest.fixture(scope="class")
def vitl(comfy_pack, tmp_path_factory):
    """A random CLIP ViT-L/14 file (the smallest layout Load CLIP Vision detects) loaded by ComfyUI's loader and by the
    trainer's. Class-scoped, so its 1.8 GB are freed before the end-to-end test."""
    import comfy.clip_vision

    root = tmp_path_factory.mktemp("vitl")
    config = comfy_clip_vision_config("vitl")
    path = write_clip_vision(root / "vitl.safetensors", config)
    comfy_model = comfy.clip_vision.load(str(path))  # what Load CLIP Vision runs
    trainer_model = trainer_clip_model(write_transformers_clip_vision(root / "vitl-transformers", path, config))
    return comfy_model, trainer_model


class TestLoadClipVision:
    """Features of Load CLIP Vision's ViT-L/14 vs the trainer's, of a synthetic crop and of a real photo."""

    def test_the_trainer_gives_the_same_features_of_a_crop(self, pack, vitl):
        from idadapter_core.hosts.transformers_clip import clip_encoder_from_transformers

        comfy_model, trainer_model = vitl
        crops = synthetic_crops(1)
        with torch.inference_mode():
            comfy = pack["face_nodes"].comfy_clip_encoder(comfy_model)(crops)
        ours = clip_encoder_from_transformers(trainer_model)(crops)
        assert comfy[0].shape == (1, 257, 1024) and comfy[1].shape == (1, 768)
        assert_same_features(ours, comfy)

    def test_a_real_photo_gives_the_trainer_the_features_extract_face_features_gives(self, pack, vitl, tmp_path):
        """Node side: ComfyUI's Load Image, the pack's Load InsightFace, and what Extract Face Features runs. Trainer
        side: `prepare` on the same file, then `FrozenFeatures`. The photo is a PNG (obama2 as RGBA): ComfyUI's Load
        Image decodes JPEGs with PyAV, whose pixels differ from PIL's (the trainer's) by up to 3 levels, which is not
        what this test is about."""
        from idadapter_core.face import load_face_analyzer
        from idadapter_core.hosts.transformers_clip import clip_encoder_from_transformers
        from train.cache import TrainCache
        from train.data import FrozenFeatures, ReferenceKey
        from train.prepare import prepare_dataset

        assets = shared_assets_or_skip()
        comfy_model, trainer_model = vitl
        photo = assets / "faces" / "32bit.png"
        with comfy_folders(photo.parent, insightface=assets / "insightface"), torch.inference_mode():
            image = pack["comfy_nodes"].LoadImage().load_image(photo.name)[0]
            analyzer = pack["face_nodes"].LoadInsightFace.execute(FACE_PACK, "CPU", 640).result[0]
            encode = pack["face_nodes"].comfy_clip_encoder(comfy_model)
            comfy, references = pack["face"].extract_face_features(analyzer, image, encode, num_refs=1)

        (tmp_path / "photos" / "obama").mkdir(parents=True)
        shutil.copy(photo, tmp_path / "photos" / "obama" / photo.name)
        trainer_analyzer = load_face_analyzer(assets / "insightface", FACE_PACK, "CPU", 640)
        prepare_dataset(tmp_path / "photos", tmp_path / "cache", trainer_analyzer, min_images=1, augmentations=0)
        cache = TrainCache(tmp_path / "cache")
        frozen = FrozenFeatures(cache, None, clip_encoder_from_transformers(trainer_model), 64, torch.device("cpu"))
        ours = frozen.references([(ReferenceKey(0),)])

        assert np.array_equal(cache.clip_crop(0).numpy(), references[0].clip_crop)  # the same crop, bit for bit
        torch.testing.assert_close(ours["face_embeds"][0], comfy.face_embeds, rtol=0, atol=1e-6)
        assert_same_features((ours["clip_patches"][0], ours["clip_image_embeds"][0]),
                             (comfy.clip_patches, comfy.clip_image_embeds))


# ---------------------------------------------------------------------------------------------------- end to end

CHECKPOINT_NAME = "idadapter-trainer-base-sd15.safetensors"
WEIGHTS_NAME = "idadapter-trained-by-the-test.safetensors"
TRAINING_PHOTOS = {"obama": ("obama.jpg", "obama2.jpg", "obama3.jpg"), "biden": ("biden.jpg",)}
# Tiny sizes and a high learning rate, so that two steps move every trained part visibly. The face-ID loss is off:
# test_train_fit covers it, and here it would decode through SD's full-size VAE with gradients at every step.
FIT_SETTINGS = dict(
    num_refs=2, mff_width=64, mff_heads=4, batch_size=1, max_steps=2, checkpoint_every=2, resolution=32, lr=1e-3,
    identity_dropout=0.0, face_id_weight=0.0, log_with="none", class_word="man",
)


def fit(config):
    """`train.fit.train`, with accelerate's process-wide state reset first (another run in this process may have set
    it)."""
    from accelerate.state import AcceleratorState, GradientState

    from train.fit import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train(config)


@pytest.fixture(scope="module")
def trained(comfy_pack, tmp_path_factory):
    """prepare -> fit -> export, on a base model written as a ComfyUI SD1.5 checkpoint (the trainer reads that very
    file with diffusers' single-file loader) and a CLIP vision file in ComfyUI's layout."""
    from idadapter_core.face import load_face_analyzer
    from train.config import resolve_config
    from train.export import export_checkpoint
    from train.prepare import prepare_dataset

    assets = shared_assets_or_skip()
    root = tmp_path_factory.mktemp("comfy_train")
    for folder in ("checkpoints", "clip_vision", "idadapter"):
        (root / folder).mkdir()
    checkpoint = write_tiny_sd15_checkpoint(root / "checkpoints" / CHECKPOINT_NAME, vae="kl")
    clip_file = write_clip_vision(root / "clip_vision" / "tiny-clip-vision.safetensors", TINY_CLIP_VISION)
    for identity, photos in TRAINING_PHOTOS.items():
        (root / "photos" / identity).mkdir(parents=True)
        for photo in photos:
            shutil.copy(assets / "faces" / photo, root / "photos" / identity / photo)
    analyzer = load_face_analyzer(assets / "insightface", FACE_PACK, "CPU", 640)
    prepare_dataset(root / "photos", root / "cache", analyzer, class_word="man", min_images=1, augmentations=1)
    config = resolve_config(None, dict(
        FIT_SETTINGS, cache=str(root / "cache"), output_dir=str(root / "run"), single_file=str(checkpoint),
        config_folder=str(write_tiny_sd15_config_folder(root / "sd15-configs")),
        clip_vision=str(write_transformers_clip_vision(root / "tiny-clip-vision", clip_file, TINY_CLIP_VISION)),
    ))
    result = fit(config)
    exported = export_checkpoint(result.checkpoint, root / "idadapter" / WEIGHTS_NAME, dtype="fp16")
    return dict(root=root, assets=assets, config=config, clip_file=clip_file, adapter=result.adapter, exported=exported)


@pytest.fixture(scope="module")
def graph(pack, trained):
    """The graph's nodes up to the sampler: Load Checkpoint (the trainer's base file), Load IDAdapter (the exported
    file), Load InsightFace, Load Image, Extract Face Features, Encode Identity, Apply IDAdapter, Identity Prompt and
    a plain CLIP Text Encode of the same prompt."""
    nodes, face_nodes, comfy_nodes = pack["idadapter_nodes"], pack["face_nodes"], pack["comfy_nodes"]
    root, assets = trained["root"], trained["assets"]
    folders = dict(checkpoints=root / "checkpoints", idadapter=root / "idadapter", insightface=assets / "insightface")
    with comfy_folders(assets / "faces", **folders), torch.inference_mode():
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]
        adapter = nodes.LoadIDAdapter.execute(WEIGHTS_NAME).result[0]
        analyzer = face_nodes.LoadInsightFace.execute(FACE_PACK, "CPU", 640).result[0]
        image = comfy_nodes.LoadImage().load_image("obama2.jpg")[0]
        # Load CLIP Vision does not detect the tiny layout from its keys; the same file through ComfyUI's own class
        clip_vision = load_clip_vision(trained["clip_file"], TINY_CLIP_VISION)
        features = face_nodes.ExtractFaceFeatures.execute(
            analyzer, clip_vision, image, 2, "replicate", -1, 64, 0).result[0]
        embeds = nodes.EncodeIdentity.execute(adapter, features).result[0]
        return dict(
            model=model, clip=clip, vae=vae, adapter=adapter, features=features, embeds=embeds,
            patched=nodes.ApplyIDAdapter.execute(model, adapter, embeds, 1.0, 0.0, 1.0).result[0],
            identity_prompt=nodes.IdentityPrompt.execute(clip, adapter, embeds, "a photo", "").result[0],
            plain_prompt=comfy_nodes.CLIPTextEncode().encode(clip, "a photo, man is sks")[0],
        )


def test_exported_weights_load_in_the_nodes_and_change_the_generation(pack, trained, graph):
    comfy_nodes = pack["comfy_nodes"]
    with torch.inference_mode():
        negative = comfy_nodes.CLIPTextEncode().encode(graph["clip"], "")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(32, 32, 1)[0]

        def generate(model, positive) -> torch.Tensor:
            sampled = comfy_nodes.KSampler().sample(model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)
            return sampled[0]["samples"]

        bare = generate(graph["model"], graph["plain_prompt"])
        ours = generate(graph["patched"], graph["identity_prompt"])
        adapter_only = generate(graph["patched"], graph["plain_prompt"])
        prompt_only = generate(graph["model"], graph["identity_prompt"])
        decoded = comfy_nodes.VAEDecode().decode(graph["vae"], {"samples": ours})[0]

    # the node holds the trained weights (exported as float16) and the features of the face model trained with
    trained_weights, loaded = trained["adapter"].state_dict(), graph["adapter"].model.state_dict()
    assert loaded.keys() == trained_weights.keys()
    assert all(torch.equal(loaded[k].cpu(), trained_weights[k].to(torch.float16)) for k in loaded)
    assert graph["features"].face_model == graph["adapter"].config.face_model == FACE_PACK
    for latents in (bare, ours, adapter_only, prompt_only):
        assert latents.shape == (1, 4, 4, 4) and torch.isfinite(latents).all()
    assert decoded.shape == (1, 32, 32, 3) and torch.isfinite(decoded).all()
    scale = float(bare.abs().max())
    changed = {"adapter and identity prompt": ours, "adapter": adapter_only, "identity prompt": prompt_only}
    for name, latents in changed.items():
        assert float((latents - bare).abs().max()) > 1e-3 * scale, name


def test_comfyui_gives_the_unet_what_the_trainer_trained_it_on(trained, graph):
    """The trainer's base (diffusers' single-file loader) and ComfyUI's Load Checkpoint read the same file: with the
    same E_c and E_r, Identity Prompt's conditioning is the trainer's text context, and the UNet with Apply IDAdapter's
    patches computes what the trainer's UNet with the exported adapter computes."""
    import comfy.model_management

    from idadapter_core import load_idadapter
    from idadapter_core.hosts import DiffusersIDAdapter
    from train.models import load_base_model

    base = load_base_model(trained["config"])
    embeds = graph["embeds"]
    with torch.no_grad():
        token_ids = base.text.tokenize(["a photo"], ["man"], [True])
        context, _ = base.text.encode(token_ids, {"l": embeds.identity_tokens["l"].clone()})
    comfy_context = graph["identity_prompt"][0][0]
    torch.testing.assert_close(context, comfy_context.float(), rtol=1e-4, atol=1e-4)

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500.0])
    patched = graph["patched"]
    comfy.model_management.load_models_gpu([patched])  # the K/V differences ride in attn2 patches, not the weights
    comfy_unet, options = patched.model.diffusion_model, patched.model_options["transformer_options"]
    with torch.inference_mode():
        ours = comfy_unet(x, t, context, transformer_options={
            "patches": options["patches"], "patches_replace": options["patches_replace"]}).float()
        comfy_bare = comfy_unet(x, t, context, transformer_options={}).float()
    adapter = load_idadapter(trained["exported"], model_layout=base.layout, dtype=torch.float32)
    with torch.no_grad():
        with DiffusersIDAdapter(base.unet, adapter) as binding:
            binding.set_identity(embeds.reference_tokens.clone())
            theirs = base.unet(x, t, encoder_hidden_states=context).sample
        bare = base.unet(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(comfy_bare, bare, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert float((ours - comfy_bare).abs().max()) > 1e-3 * float(comfy_bare.abs().max())


def test_an_exported_inv_adapter_loads_in_the_nodes_and_changes_the_generation(pack, trained, tmp_path):
    """The same base file and cache, `method: inv-adapter`: fit -> export -> Load Inv-Adapter -> Invert Reference ->
    Apply Inv-Adapter -> KSampler."""
    from dataclasses import replace

    from train.export import export_checkpoint

    root, assets, comfy_nodes = trained["root"], trained["assets"], pack["comfy_nodes"]
    config = replace(trained["config"], method="inv-adapter", clip_vision="", output_dir=str(tmp_path / "inv-run"))
    result = fit(config)
    (root / "inv_adapter").mkdir(exist_ok=True)
    export_checkpoint(result.checkpoint, root / "inv_adapter" / "trained-inv.safetensors", dtype="fp16")
    inv_nodes = importlib.import_module("comfyui_idadapter.nodes.inv_adapter_nodes")
    folders = dict(checkpoints=root / "checkpoints", inv_adapter=root / "inv_adapter")
    with comfy_folders(assets / "faces", **folders), torch.inference_mode():
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]
        adapter = inv_nodes.LoadInvAdapter.execute("trained-inv.safetensors").result[0]
        image = comfy_nodes.LoadImage().load_image("obama2.jpg")[0]
        reference = inv_nodes.InvertReference.execute(model, vae, clip, image, 3).result[0]
        patched = inv_nodes.ApplyInvAdapter.execute(model, adapter, reference, 1.0, 0.0, 1.0).result[0]
        positive = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a man")[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(32, 32, 1)[0]
        bare, ours = (comfy_nodes.KSampler().sample(m, 0, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
                      for m in (model, patched))
    trained_weights, loaded = result.adapter.state_dict(), adapter.model.state_dict()
    assert all(torch.equal(loaded[k].cpu(), trained_weights[k].to(torch.float16)) for k in trained_weights)
    assert torch.isfinite(ours).all() and float((ours - bare).abs().max()) > 0
