"""bench/real_scale.py (with bench/real_scale_run.py, _parts.py, _meta.py): its measuring tools in seconds (default
run), the rehearsal with the trainer's tiny models (slow), and the host tests at full size: full-size SD1.5 IDAdapter
and Inv-Adapter weights written by the trainer's checkpoint and export code, loaded by their Load nodes and applied to
a full-size SD1.5 checkpoint for one sampling step at 512², Inv-Adapter's reference DDIM-inverted by Invert Reference
(slow, COMFYUI_PATH)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import shared_assets_or_skip

from bench import real_scale, real_scale_meta, real_scale_run
from bench.common import SD15_COMFY_UNET
from train.real_size_models import FACE_PACK, IRESNET100, open_idadapter, open_inv_adapter, write_face_pack

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the measuring tools (CI) --------------------------------------------------------------------------------------

def test_a_command_past_the_memory_cap_is_killed_and_its_peak_reported(tmp_path):
    hog = "import time; block = bytearray(400 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(30)"
    result = real_scale_run.run_command("hog", [sys.executable, "-c", hog], 0.2, tmp_path / "hog.log")
    assert result.stopped == "memory cap" and result.returncode != 0
    assert 0.2 <= result.peak_rss_gib < 0.5
    assert result.seconds < 20


def test_a_command_is_killed_when_asked_and_its_progress_read(tmp_path):
    marker = tmp_path / "checkpoint"
    script = ("import sys, time, pathlib\n"
              "for step, loss in enumerate((0.5, 0.25), 1):\n"
              "    sys.stderr.write(f'\\rfit:  {50 * step}%| | {step}/2 [00:0{step}<00:00, 1.50s/it, loss={loss}]')\n"
              f"pathlib.Path({str(marker)!r}).mkdir()\n"
              "time.sleep(30)\n")
    result = real_scale_run.run_command("fit", [sys.executable, "-c", script], 4.0, tmp_path / "fit.log",
                                    kill_when=marker.is_dir)
    assert result.stopped == "on purpose" and result.seconds < 20
    assert result.seconds_per_step == 1.5 and result.losses == [0.5, 0.25]


def test_saved_activations_are_counted_once_without_parameters_or_attention_matrices():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    saved = real_scale_meta.SavedBytes(list(linear.parameters()))
    v = torch.randn(1, 2, 300, 8)
    with saved.attention, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        y = linear(x)  # saves x (the weight is a parameter)
        z = (y * y).sum()  # saves y, twice: one storage
        probabilities = torch.randn(1, 2, 16, 300, requires_grad=True).softmax(-1)  # saved by softmax and matmul:
        out = probabilities.reshape(2, 16, 300) @ v.reshape(2, 300, 8)  # an attention matrix, not counted
    assert saved.gib * 2**30 == (x.numel() + y.numel() + v.numel()) * 4  # v: the matmul's other operand
    del z, out


def parts_of(batches: dict[int, float], gradients: float = 1.0) -> dict:
    """Measured parts of an imagined run: activations + gradients per batch at 256 px, batch 1 at 512 px."""
    steps = [dict(batch=b, gradient_checkpointing=gc, resolution=256, peak_above_models_gib=v * (0.5 if gc else 1) +
                  gradients, gradients_gib=gradients) for gc in (True, False) for b, v in batches.items()]
    steps.append(dict(batch=1, gradient_checkpointing=True, resolution=512,
                      peak_above_models_gib=batches[1] * 0.5 * 4 + gradients, gradients_gib=gradients))
    return dict(base="sd15", resolution=512, parts_resolution=256, steps=steps,
                decode=[dict(batch=b, gradient_checkpointing=False, peak_above_models_gib=0.25 * b) for b in (1, 2)],
                frozen_gib_fp32=dict(unet=4.0, text_encoders=0.5, vae=0.25, clip_vision=2.0, face_recognizer=0.25),
                trainable_gib=1.0, optimizer=dict(adam_state_gib=2.0, adam8bit_state_gib=0.5))


def counted_for(saved_fp32: float, saved_bf16: float, unet: int = 100, adapter: int = 10) -> dict:
    entry = {dtype: dict(saved_gib=saved, unet_params=unet, adapter_params=adapter, gflops=1000.0)
             for dtype, saved in (("fp32", saved_fp32), ("bf16", saved_bf16))}
    return {"sd15": {"resolution": 512, "decode_gflops": 500.0, "idadapter": entry}}


def test_gpu_memory_is_projected_from_the_per_sample_slope_of_the_measured_parts():
    parts = parts_of({1: 2.0, 2: 3.0})  # 1 GiB per sample over a 1 GiB intercept, fp32, at 256 px
    projection = real_scale.project(parts, counted_for(2.0, 1.0), "sd15", "idadapter")
    rows = {(r["optimizer"], r["gradient_checkpointing"]): r for r in projection["rows"]}
    # frozen: UNet and text in bf16 (4.5 / 2), the rest fp32; adapter 1 + gradients 1 + Adam 2; CUDA 1
    static = 2.25 + 2.5 + 4.0 + real_scale.CUDA_OVERHEAD_GIB
    assert projection["frozen_gib"] == pytest.approx(4.75)
    assert rows["adam", False]["static_gib"] == pytest.approx(static)
    # activations: bf16 half of fp32, x4 from 256 to 512 px (measured: batch 1 with checkpointing); the face-ID
    # decode measured at 256 px, x4 by pixels
    per_sample = 1.0 * 0.5 * 4
    decode = 0.25 * 4
    assert rows["adam", False]["activation_gib_per_sample"] == pytest.approx(per_sample)
    for batch in real_scale.PROJECTED_BATCHES:
        expected = static + 1.0 * 0.5 * 4 + per_sample * batch + decode * batch
        assert rows["adam", False]["gib_per_batch"][batch] == pytest.approx(expected)
    assert rows["adam8bit", False]["static_gib"] == pytest.approx(static - 1.5)
    assert rows["adam", True]["activation_gib_per_sample"] == pytest.approx(per_sample / 2)
    fits_24 = rows["adam", False]["largest_batch"][24]
    assert rows["adam", False]["gib_per_batch"][1] <= 24
    assert static + 2.0 + (per_sample + decode) * fits_24 <= 24 < static + 2.0 + (per_sample + decode) * (fits_24 + 1)


def test_hours_follow_from_the_counted_flops_and_the_utilisation():
    counted = counted_for(2.0, 1.0)
    hours = real_scale.hours(counted, "sd15", "idadapter", mfu=0.5)
    flops = (1000.0 + 500.0) * 1e9 * real_scale.PAPER_STEPS * real_scale.PAPER_BATCH
    assert hours["A100"] == pytest.approx(flops / (312e12 * 0.5) / 3600)
    assert hours["H100 SXM"] < hours["A100"]


# ---- the rehearsal, tiny models (slow) -----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_quick_rehearsal_runs_every_command_and_resumes_exactly(tmp_path, capsys):
    assets = shared_assets_or_skip()
    out = tmp_path / "summary.json"
    code = real_scale.main(["--quick", "--assets", str(assets), "--workdir", str(tmp_path / "work"), "--threads", "1",
                            "--json", str(out)])
    summary = json.loads(out.read_text())
    assert code == 0, capsys.readouterr().out
    assert summary["rehearsal"]["resume_exact"] == {"idadapter": True, "inv-adapter": True}
    assert summary["rehearsal"]["losses_finite"] is True
    names = [c["name"] for c in summary["rehearsal"]["commands"]]
    assert names[0] == "prepare" and any("eval" in n for n in names) and any("inv-adapter: export" in n for n in names)
    for method in ("idadapter", "inv-adapter"):
        measured = [s for s in summary["parts"][method]["steps"] if "peak_above_models_gib" in s]
        assert len(measured) == 5 and all(s["loss"] > 0 for s in measured)
    assert {"sd15/idadapter", "sdxl/idadapter", "sd21/inv-adapter"} <= set(summary["projections"])
    assert "largest_batch" in summary["projections"]["sdxl/idadapter"]["rows"][0]


# ---- full size in ComfyUI (slow, COMFYUI_PATH) ---------------------------------------------------------------------

CHECKPOINT = "full-size-sd15-random.safetensors"
WEIGHTS = "full-size-idadapter-exported.safetensors"
INV_WEIGHTS = "full-size-inv-adapter-exported.safetensors"


def write_full_sd15_checkpoint(path: Path) -> Path:
    """SD1.5's UNet, CLIP-L text encoder and KL VAE at full size, random weights, float16, in the keys of an SD1.5
    checkpoint file."""
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.sd1_clip import SDClipModel
    from safetensors.torch import save_file

    from comfy_fixtures import SD_VAE_DDCONFIG, randomize_

    ops = comfy.ops.disable_weight_init
    state = {}
    for prefix, module, seed in (
        ("model.diffusion_model.", UNetModel(**SD15_COMFY_UNET, operations=ops), 0),
        ("cond_stage_model.", SDClipModel(), 1),
        ("first_stage_model.", AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4), 2),
    ):
        randomize_(module, seed)
        state.update({prefix + k: v.to(torch.float16) for k, v in module.state_dict().items() if v.is_floating_point()})
        del module
    save_file(state, str(path))
    return path


def export_through_the_trainer(adapter: torch.nn.Module, method: str, out: Path) -> Path:
    """`adapter` saved by the trainer's checkpoint code (as `fit` saves it) and written to `out` by its `export` (fit
    itself at full size takes minutes a step here: bench/real_scale.py runs it)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_constant_schedule_with_warmup

    from train.checkpoints import save_checkpoint
    from train.export import export_checkpoint

    optimizer = torch.optim.Adam(adapter.parameters(), lr=3e-5)
    checkpoint = save_checkpoint(Accelerator(cpu=True), out.parent.parent / f"{method}-run", 1, adapter, optimizer,
                                 get_constant_schedule_with_warmup(optimizer, 0), {"method": method})
    return export_checkpoint(checkpoint, out, dtype="fp16")


def export_full_size_idadapter(root: Path, face_dim: int, face_model: str) -> Path:
    """A full-size sd15 IDAdapter (ViT-H references, N = 4, gates opened and K/V deltas set so that it acts)."""
    from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig
    from idadapter_core.presets import PRESETS

    torch.manual_seed(0)
    adapter = IDAdapter(IDAdapterConfig(
        layout=PRESETS["sd15"], num_refs=4, clip_embed_dim=1024, clip_vision="clip-vision-h", face_model=face_model,
        mff=MFFConfig(clip_dim=1280, face_dim=face_dim, num_patches=256)))
    open_idadapter(adapter, 0.5, kv_std=0.01)
    return export_through_the_trainer(adapter, "idadapter", root / "idadapter" / WEIGHTS)


def assert_one_step_changes(model, patched, positive, negative) -> None:
    """One KSampler step at 512² with the bare and the patched model: same finite shape, a visible difference."""
    import nodes as comfy_nodes

    latent = comfy_nodes.EmptyLatentImage().generate(512, 512, 1)[0]
    bare, ours = (comfy_nodes.KSampler().sample(m, 0, 1, 5.0, "euler", "normal", positive, negative, latent)[0]
                  ["samples"] for m in (model, patched))
    assert ours.shape == bare.shape == (1, 4, 64, 64) and torch.isfinite(ours).all()
    assert float((ours - bare).abs().max()) > 1e-3 * float(bare.abs().max())


@pytest.mark.slow
@pytest.mark.comfyui
def test_full_size_exported_weights_apply_to_a_full_size_sd15_checkpoint_for_one_step(comfy_pack, tmp_path):
    from comfy_fixtures import comfy_clip_vision_config, comfy_folders, write_clip_vision

    assets = shared_assets_or_skip()
    torch.set_num_threads(2)
    for folder in ("checkpoints", "clip_vision", "idadapter"):
        (tmp_path / folder).mkdir()
    write_face_pack(tmp_path / "insightface", quick=False, assets=assets)
    write_full_sd15_checkpoint(tmp_path / "checkpoints" / CHECKPOINT)
    write_clip_vision(tmp_path / "clip_vision" / "clip-vision-h.safetensors", comfy_clip_vision_config("h"))
    exported = export_full_size_idadapter(tmp_path, face_dim=IRESNET100.embed_dim, face_model=FACE_PACK)

    nodes = importlib.import_module("comfyui_idadapter.nodes.idadapter_nodes")
    face_nodes = importlib.import_module("comfyui_idadapter.nodes.face_nodes")
    import nodes as comfy_nodes

    folders = dict(checkpoints=tmp_path / "checkpoints", idadapter=tmp_path / "idadapter",
                   clip_vision=tmp_path / "clip_vision", insightface=tmp_path / "insightface")
    with comfy_folders(assets / "faces", **folders), torch.inference_mode():
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
        adapter = nodes.LoadIDAdapter.execute(WEIGHTS).result[0]
        clip_vision = comfy_nodes.CLIPVisionLoader().load_clip("clip-vision-h.safetensors")[0]
        analyzer = face_nodes.LoadInsightFace.execute(FACE_PACK, "CPU", 640).result[0]
        image = comfy_nodes.LoadImage().load_image("obama2.jpg")[0]
        features = face_nodes.ExtractFaceFeatures.execute(analyzer, clip_vision, image, 4, "replicate", -1, 64, 0).result[0]
        embeds = nodes.EncodeIdentity.execute(adapter, features).result[0]
        patched = nodes.ApplyIDAdapter.execute(model, adapter, embeds, 1.0, 0.0, 1.0).result[0]
        positive = nodes.IdentityPrompt.execute(clip, adapter, embeds, "a photo", "").result[0]
        assert_one_step_changes(model, patched, positive, comfy_nodes.CLIPTextEncode().encode(clip, "")[0])

    assert adapter.config.layout.base == "sd15" and adapter.config.mff.face_dim == IRESNET100.embed_dim
    assert sum(p.numel() for p in adapter.model.parameters()) > 250e6  # the full sd15 adapter, not a tiny one
    assert exported.stat().st_size > 500e6


@pytest.mark.slow
@pytest.mark.comfyui
def test_full_size_inv_adapter_inverts_a_photo_and_applies_to_a_full_size_sd15_checkpoint(comfy_pack, tmp_path):
    """Load Inv-Adapter -> Invert Reference (2 DDIM steps through the full UNet at 512²) -> Apply Inv-Adapter ->
    KSampler, one step."""
    from comfy_fixtures import comfy_folders

    from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig
    from idadapter_core.presets import PRESETS

    assets = shared_assets_or_skip()
    torch.set_num_threads(2)
    for folder in ("checkpoints", "inv_adapter"):
        (tmp_path / folder).mkdir()
    write_full_sd15_checkpoint(tmp_path / "checkpoints" / CHECKPOINT)
    torch.manual_seed(0)
    trained = open_inv_adapter(InvAdapter(InvAdapterConfig(PRESETS["sd15"])))
    exported = export_through_the_trainer(trained, "inv-adapter", tmp_path / "inv_adapter" / INV_WEIGHTS)

    inv_nodes = importlib.import_module("comfyui_idadapter.nodes.inv_adapter_nodes")
    import nodes as comfy_nodes

    folders = dict(checkpoints=tmp_path / "checkpoints", inv_adapter=tmp_path / "inv_adapter")
    with comfy_folders(assets / "faces", **folders), torch.inference_mode():
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
        adapter = inv_nodes.LoadInvAdapter.execute(INV_WEIGHTS).result[0]
        image = comfy_nodes.LoadImage().load_image("obama2.jpg")[0]
        image = comfy_nodes.ImageScale().upscale(image, "bilinear", 512, 512, "center")[0]
        reference = inv_nodes.InvertReference.execute(model, vae, clip, image, 2).result[0]
        patched = inv_nodes.ApplyInvAdapter.execute(model, adapter, reference, 1.0, 0.0, 1.0).result[0]
        positive = comfy_nodes.CLIPTextEncode().encode(clip, "a photo")[0]
        assert_one_step_changes(model, patched, positive, comfy_nodes.CLIPTextEncode().encode(clip, "")[0])

    parameters = sum(p.numel() for p in adapter.model.parameters())
    assert adapter.config.layout.base == "sd15" and 49e6 < parameters < 50.5e6  # the paper's 49.6 M
    assert exported.stat().st_size > 95e6
    assert reference.latents.shape[-2:] == (64, 64)


# ---- what the rehearsal broke --------------------------------------------------------------------------------------

def test_inv_adapter_trains_without_an_insightface_pack_but_idadapter_with_the_face_id_loss_needs_one():
    """Inv-Adapter has no face-ID loss: the default λ = 0.1 must not demand --insightface-root of it (the rehearsal's
    first Inv-Adapter fit stopped there)."""
    from train.config import ConfigError, resolve_config

    settings = dict(cache="cache", output_dir="out", pretrained="base")
    assert resolve_config(None, dict(settings, method="inv-adapter")).face_id_weight == 0.1
    with pytest.raises(ConfigError, match="insightface-root"):
        resolve_config(None, dict(settings, method="idadapter", clip_vision="clip"))
