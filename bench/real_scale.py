"""The trainer rehearsed at real model sizes: memory and time measured on the CPU, and projected to GPUs.

Models (random weights, real layouts, written as local folders the trainer loads as it loads real ones): the SD1.5 or
SD2.1-base UNet, VAE and text encoder (diffusers/transformers configs of those models; the text encoder has CLIP's
49,408-token embedding table, the tokenizer is the trainer's tiny one with 77 tokens), OpenCLIP ViT-H/14's vision
tower, and an insightface pack made of the real SCRFD-2.5G detector (../shared/assets) and an IResNet-100 with random
weights exported to ONNX as glintr100.onnx, which the face-ID loss converts with train/onnx_to_torch.py as it does
antelopev2's file. `--quick` swaps in the trainer's tiny models and an IResNet of one block per stage: the same code
paths in seconds (the smoke test).

1. Rehearsal, the trainer's own commands in subprocesses: `prepare` on the four real photos of ../shared/assets/faces
   (two identities), `fit` at the paper's settings (N = 4, λ = 0.1 face-ID loss, gradient checkpointing, bf16 autocast
   when the CPU has bf16 instructions, else fp32) for `--steps` steps; the same run SIGKILLed after its first
   checkpoint and resumed with `--resume latest` must end with the same adapter bytes; `export`; `eval` of one
   identity x one prompt (IDAdapter; `eval` scores IDAdapter weights only). Inv-Adapter too, with DDIM-inverted
   references (`--reference-features inversion`). Each command's wall time and peak RSS are recorded; a command whose
   RSS passes `--memory-cap-gib` is killed and reported as such.
2. Memory of each part (one subprocess per base and method, so its RSS is its own): frozen models and trainable
   parameters (bytes of their tensors), Adam's state (after one step; bitsandbytes' 8-bit Adam too when it imports),
   and the peak RSS above the loaded models during one training step's forward and backward at batch 1 and 2, with
   and without gradient checkpointing, and at 256 px (the resolution scaling); the face-ID loss's VAE decode with
   gradients the same way. fp32 (the CPU's): GPU bf16 numbers are projected with the ratio of saved-for-backward bytes
   counted on the meta device in bf16 and fp32.
3. FLOPs of one training step, counted (`bench.train_throughput.count_flops`) on the meta device for SD1.5, SD2.1 and
   SDXL (1024 px), and a full-UNet training step for the utilisation reference (MosaicML's SD2-base UNet throughput on
   A100s, 290 images/s on 8 GPUs at 512 px: github.com/mosaicml/diffusion README).
4. A table: per base, GPU memory and batch, whether it fits with which options, and the projected hours of 50k steps
   x batch 4 on an A100 and an H100 at that utilisation. What was measured and what projected is said in each row.

Run: `python -m bench.real_scale [--quick] [--base sd15] [--methods idadapter inv-adapter] [--json PATH]`.
At full size on a CPU one training step takes minutes (3-5 on 2 shared cores, fp32) and the whole run hours, within
~11 GiB of RAM: `--skip rehearsal|parts`, `--rehearse`, `--fit-resolution` and `--parts-resolution` cut it down, and
`--workdir` keeps what was measured for a later summary. Prints a table and exits 0 (a report), 1 when a rehearsal
step failed or a resumed run did not end where the uninterrupted one did.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO_ROOT.parent / "shared" / "assets"
for extra in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.append(str(extra))

from bench.step_overhead import SD15_UNET  # noqa: E402
from bench.train_throughput import CLIP_L_TEXT, FACE_ID_WEIGHT, NUM_REFS, SD_VAE, VIT_H_14, count_flops  # noqa: E402

log = logging.getLogger("real_scale")

GIB = 2**30
FACE_PACK = "realscale_antelope"
DETECTOR = Path("insightface") / "models" / "standin_scrfd_mbf128" / "det_2.5g.onnx"
"""The real SCRFD-2.5G detector, under the assets folder."""
PHOTOS = {"obama": ("obama.jpg", "obama2.jpg", "obama3.jpg"), "biden": ("biden.jpg",)}
TEXT_VOCAB, TEXT_TOKENS = 49408, 77
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    steps_offset=1, prediction_type="epsilon")
"""SD1.5's and SD2.1-base's (512 px, ε) noise schedule."""

# ---- the real layouts --------------------------------------------------------------------------------------------

SD_UNET_BLOCKS = {k: SD15_UNET[k] for k in ("block_out_channels", "layers_per_block", "down_block_types",
                                               "up_block_types")}
OPENCLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                       hidden_act="gelu")
OPENCLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280)


@dataclass(frozen=True)
class BaseSpec:
    """A base model's parts as diffusers/transformers constructor arguments."""

    unet: dict
    texts: tuple[dict, ...]
    """One CLIPTextConfig kwargs per text encoder (SDXL: l, then g)."""
    resolution: int


BASES = {
    "sd15": BaseSpec(dict(SD_UNET_BLOCKS, attention_head_dim=8, cross_attention_dim=768),
                     (dict(CLIP_L_TEXT, hidden_act="quick_gelu"),), 512),
    "sd21": BaseSpec(dict(SD_UNET_BLOCKS, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                          cross_attention_dim=1024), (OPENCLIP_H_TEXT,), 512),
    "sdxl": BaseSpec(dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                          use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                          addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
                     (dict(CLIP_L_TEXT, hidden_act="quick_gelu"), OPENCLIP_BIGG_TEXT), 1024),
}
"""SD2.1 is SD2.1-base (512 px, ε); its 768-v twin has the same shapes. SDXL is counted (meta device), never built."""
VIT_H = dict(VIT_H_14, hidden_act="gelu", layer_norm_eps=1e-5)
IRESNET100 = ((3, 13, 30, 3), (64, 128, 256, 512), 512)
"""stages, widths, embedding width."""
QUICK_IRESNET = ((1, 1, 1, 1), (8, 16, 32, 64), 64)


# ---- model folders -----------------------------------------------------------------------------------------------

def write_base_model(folder: Path, base: str, seed: int = 0) -> Path:
    """A diffusers StableDiffusionPipeline folder of `base` (sd15 or sd21) with random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from train.tiny_models import tiny_clip_tokenizer

    spec = BASES[base]
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(max_length=TEXT_TOKENS)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=TEXT_VOCAB, max_position_embeddings=TEXT_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec.texts[0]))
    vae = AutoencoderKL(sample_size=spec.resolution, **SD_VAE)
    unet = UNet2DConditionModel(sample_size=spec.resolution // 8, **spec.unet)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def write_clip_vision(folder: Path, quick: bool, seed: int = 0) -> Path:
    if quick:
        from train.tiny_models import write_tiny_clip_vision

        return write_tiny_clip_vision(folder, seed)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).save_pretrained(folder)
    return folder


def write_face_pack(root: Path, quick: bool, assets: Path) -> Path:
    """ROOT/models/realscale_antelope/: the real detector and a random IResNet exported as insightface exports its
    recognizers (glintr100.onnx is antelopev2's IResNet-100)."""
    from recognizer_archs import IResNet, export_like_insightface, randomize

    folder = root / "models" / FACE_PACK
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(assets / DETECTOR, folder / DETECTOR.name)
    stages, widths, features = QUICK_IRESNET if quick else IRESNET100
    if not (folder / "glintr100.onnx").is_file():
        export_like_insightface(randomize(IResNet(stages, widths, features), seed=0), folder / "glintr100.onnx")
    return root


def write_photos(folder: Path, assets: Path) -> Path:
    for identity, names in PHOTOS.items():
        (folder / identity).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(assets / "faces" / name, folder / identity / name)
    return folder


@dataclass
class ModelFolders:
    base: Path
    clip_vision: Path
    insightface_root: Path
    photos: Path


def write_models(workdir: Path, base: str, quick: bool, assets: Path) -> ModelFolders:
    from train.tiny_models import write_tiny_pipeline

    started = time.perf_counter()
    base_folder = workdir / "base"
    if not (base_folder / "model_index.json").is_file():
        write_tiny_pipeline(base_folder, "sd15") if quick else write_base_model(base_folder, base)
    clip = workdir / "clip_vision"
    if not (clip / "config.json").is_file():
        write_clip_vision(clip, quick)
    folders = ModelFolders(base_folder, clip, write_face_pack(workdir / "insightface", quick, assets),
                           write_photos(workdir / "photos", assets))
    log.info("model folders written in %.0f s", time.perf_counter() - started)
    return folders


# ---- commands in subprocesses, with their peak memory ------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    """Resident set size of a process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


@dataclass
class CommandResult:
    name: str
    seconds: float
    peak_rss_gib: float
    returncode: int
    stopped: str = ""
    """Why it was killed: 'memory cap' or 'on purpose' (the resume test); '' when it ran to its end."""
    tail: str = ""
    peak_gpu_gib: float = 0.0
    """GPU memory the process held at most (nvidia-smi, sampled every second), on a CUDA machine."""
    seconds_per_step: float | None = None
    """fit: tqdm's last rate (the loop alone, after the models loaded)."""
    losses: list[float] = field(default_factory=list)
    """fit: the step losses tqdm showed."""


TQDM_RATE = re.compile(r"(\d+(?:\.\d+)?)(s/it|it/s)")
TQDM_LOSS = re.compile(r"loss=([-+\w.]+)")


def read_progress(log_text: str) -> tuple[float | None, list[float]]:
    """(seconds per step, losses) from the tqdm lines of a fit log."""
    lines = [line for line in re.split(r"[\r\n]", log_text) if line.startswith("fit:")]
    rate = None
    for line in lines:
        match = TQDM_RATE.search(line.split("]")[0] + "]") if "]" in line else None
        if match:
            value = float(match.group(1))
            rate = value if match.group(2) == "s/it" else (1.0 / value if value else None)
    losses = [float(m) for line in lines for m in TQDM_LOSS.findall(line)]
    return rate, losses


def gpu_memory_gib(pid: int) -> float:
    """GPU memory held by process `pid` (nvidia-smi; 0 without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    used = [float(row.split(",")[1]) for row in out.strip().splitlines() if row.split(",")[0].strip() == str(pid)]
    return sum(used) / 1024


def run_command(name: str, argv: list[str], cap_gib: float, log_file: Path,
                kill_when: Callable[[], bool] | None = None, env: dict | None = None, gpu: bool = False) -> CommandResult:
    """Run `argv` (nice 10, as shared machines need), sampling its RSS every 0.1 s (and with `gpu` its GPU memory
    every second); SIGKILL it when RSS passes `cap_gib` or when `kill_when()` turns true."""
    started = time.perf_counter()
    with open(log_file, "w") as out:
        process = subprocess.Popen(["nice", "-n", "10", *argv], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        peak, peak_gpu, stopped, samples = 0, 0.0, "", 0
        while process.poll() is None:
            peak = max(peak, rss_bytes(process.pid))
            samples += 1
            if gpu and samples % 10 == 0:
                peak_gpu = max(peak_gpu, gpu_memory_gib(process.pid))
            if peak > cap_gib * GIB:
                stopped = "memory cap"
            elif kill_when is not None and kill_when():
                stopped = "on purpose"
            if stopped:
                process.send_signal(signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.1)
    seconds = time.perf_counter() - started
    text = log_file.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-15:])
    rate, losses = read_progress(text)
    result = CommandResult(name, seconds, peak / GIB, process.returncode, stopped, tail, peak_gpu, rate, losses)
    log.info("%s: %.0f s, peak RSS %.2f GiB, exit %s%s", name, seconds, peak / GIB, process.returncode,
             f" (killed: {stopped})" if stopped else "")
    if process.returncode != 0 and not stopped:
        log.warning("%s failed:\n%s", name, tail)
    return result


def bf16_instructions() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX); without, torch's CPU bf16 kernels are emulated and
    measured here at 0.1-0.4 GFLOP/s against 72 in fp32, unusable."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---- 1. the rehearsal --------------------------------------------------------------------------------------------

@dataclass
class Settings:
    base: str
    methods: tuple[str, ...]
    rehearse: tuple[str, ...]
    """Methods whose trainer commands are run (the others are measured by parts only)."""
    quick: bool
    steps: int
    batch_size: int
    resolution: int
    memory_cap_gib: float
    threads: int
    mixed_precision: str
    gradient_checkpointing: bool = True
    device: str = "cpu"
    """'cuda' on a GPU machine (scripts/gpu_check.sh): fit runs there, the parts are measured in CUDA memory."""
    fit_resolution: int = 512
    """Resolution of the rehearsal's fit runs (`resolution` unless --fit-resolution says otherwise)."""
    parts_resolution: int = 256
    """Resolution of the parts' batch-1/2 measurements (one batch-1 step at `resolution` gives the scaling)."""
    inversion_steps: int = 2
    measure_batches: tuple[int, ...] = (1, 2)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def fit_arguments(settings: Settings, folders: ModelFolders, cache: Path, out: Path, method: str) -> list[str]:
    args = ["-m", "train", "fit", "--method", method, "--cache", str(cache), "--output-dir", str(out),
            "--pretrained", str(folders.base), "--num-refs", str(NUM_REFS), "--batch-size", str(settings.batch_size),
            "--resolution", str(settings.fit_resolution), "--max-steps", str(settings.steps),
            "--checkpoint-every", str(kill_step(settings)), "--log-with", "none", "--deterministic",
            "--mixed-precision", settings.mixed_precision,
            "--gradient-checkpointing" if settings.gradient_checkpointing else "--no-gradient-checkpointing"]
    if settings.device == "cpu":
        args.append("--cpu")
    if method == "idadapter":
        args += ["--clip-vision", str(folders.clip_vision), "--insightface-root", str(folders.insightface_root),
                 "--face-id-weight", str(FACE_ID_WEIGHT)]
    else:
        args += ["--reference-features", "inversion", "--inversion-steps", str(settings.inversion_steps)]
    return python(*args)


def kill_step(settings: Settings) -> int:
    """The checkpoint after which the resumed run is killed: halfway (also the checkpoint interval)."""
    return max(1, settings.steps // 2)


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def rehearse(settings: Settings, folders: ModelFolders, workdir: Path) -> dict:
    """prepare, then per method: fit, fit killed after its first checkpoint and resumed, export, eval."""
    from train.checkpoints import ADAPTER_FILE, CHECKPOINTS_DIR, checkpoint_name

    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    env = {"OMP_NUM_THREADS": str(settings.threads)}
    cap = settings.memory_cap_gib
    gpu = settings.device == "cuda"
    cache = workdir / "cache"
    commands = [run_command("prepare", python(
        "-m", "train", "prepare", str(folders.photos), "--out", str(cache), "--insightface-root",
        str(folders.insightface_root), "--face-model", FACE_PACK, "--min-images", "1", "--augmentations", "1",
        "--overwrite"), cap, logs / "prepare.log", env=env)]
    results: dict = {"commands": commands, "resume_exact": {}}
    if commands[0].returncode != 0:
        return results
    final = checkpoint_name(settings.steps)
    for method in settings.rehearse:
        straight, resumed = workdir / f"{method}-straight", workdir / f"{method}-resumed"
        for folder in (straight, resumed):
            shutil.rmtree(folder, ignore_errors=True)
        fit = fit_arguments(settings, folders, cache, straight, method)
        commands.append(run_command(f"{method}: fit {settings.steps} steps", fit, cap, logs / f"{method}-fit.log",
                                    env=env, gpu=gpu))
        first = resumed / CHECKPOINTS_DIR / checkpoint_name(kill_step(settings))
        killed = fit_arguments(settings, folders, cache, resumed, method)
        commands.append(run_command(f"{method}: fit, killed after step {kill_step(settings)}'s checkpoint", killed,
                                    cap, logs / f"{method}-killed.log", kill_when=first.is_dir, env=env, gpu=gpu))
        commands.append(run_command(f"{method}: fit --resume latest", [*killed, "--resume", "latest"], cap,
                                    logs / f"{method}-resumed.log", env=env, gpu=gpu))
        ends = [folder / CHECKPOINTS_DIR / final / ADAPTER_FILE for folder in (straight, resumed)]
        results["resume_exact"][method] = all(p.is_file() for p in ends) and same_weights(*ends)
        exported = workdir / f"{method}.safetensors"
        commands.append(run_command(f"{method}: export", python(
            "-m", "train", "export", str(straight / CHECKPOINTS_DIR / final), "--out", str(exported)), cap,
            logs / f"{method}-export.log", env=env))
        if method == "idadapter":
            commands.append(run_command(f"{method}: eval, 1 identity x 1 prompt", python(
                "-m", "train", "eval", str(exported), "--pretrained", str(folders.base), "--clip-vision",
                str(folders.clip_vision), "--insightface-root", str(folders.insightface_root), "--references",
                str(folders.photos / "obama"), "--prompt", "a portrait photo", "--steps", "2", "--batch-size", "1",
                "--resolution", str(settings.fit_resolution), "--device", settings.device,
                "--out", str(workdir / "eval")), cap, logs / f"{method}-eval.log", env=env, gpu=gpu))
    fits = [c for c in commands if "fit" in c.name]
    results["losses_finite"] = bool(fits) and all(c.losses and all(map(math.isfinite, c.losses)) for c in fits)
    return results


# ---- 2. memory of each part (run in a subprocess of its own) -----------------------------------------------------

class PeakMemory:
    """The most memory this process held while the block ran, above what it held when the block started: on the CPU
    its RSS (sampled every 5 ms; glibc's mmap threshold is fixed low by the caller so that freed tensors return to the
    system), on a GPU torch's CUDA allocator statistics."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "PeakMemory":
        import ctypes

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            self.started = time.perf_counter()
            return self
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start = rss_bytes(os.getpid())
        self.peak = self.start
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss_bytes(os.getpid()))
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.started
            self.peak = torch.cuda.max_memory_allocated()
            return
        self.seconds = time.perf_counter() - self.started
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(os.getpid()))

    @property
    def above_start_gib(self) -> float:
        return (self.peak - self.start) / GIB


def tensor_gib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / GIB


def synthetic_idadapter_batch(base, batch: int, resolution: int, face_dim: int, clip_dim: int, patches: int,
                              embed_dim: int):
    from train.fit import TrainingBatch

    g = torch.Generator().manual_seed(batch)
    latent = resolution // 8
    keep = [True] * batch
    return TrainingBatch(
        latents=torch.randn(batch, 4, latent, latent, generator=g), noise=torch.randn(batch, 4, latent, latent, generator=g),
        timesteps=torch.full((batch,), 500), clip_patches=torch.randn(batch, NUM_REFS, patches, clip_dim, generator=g),
        clip_image_embeds=torch.randn(batch, NUM_REFS, embed_dim, generator=g),
        face_embeds=torch.randn(batch, NUM_REFS, face_dim, generator=g), keep_identity=torch.tensor(keep),
        token_ids=base.text.tokenize(["a photo of a person"] * batch, ["person"] * batch, keep),
        time_ids=torch.zeros(batch, 6))


def synthetic_inv_adapter_batch(base, batch: int, resolution: int):
    from train.inv_adapter_step import InvAdapterBatch

    g = torch.Generator().manual_seed(batch)
    shape = (batch, 4, resolution // 8, resolution // 8)
    plain = [False] * batch
    return InvAdapterBatch(
        latents=torch.randn(shape, generator=g), noise=torch.randn(shape, generator=g),
        timesteps=torch.full((batch,), 500), reference_latents=torch.randn(shape, generator=g),
        reference_noise=torch.randn(shape, generator=g), reference_rows=list(range(batch)),
        token_ids=base.text.tokenize(["a photo of a person"] * batch, [""] * batch, plain),
        null_token_ids=base.text.tokenize([""] * batch, [""] * batch, plain), time_ids=torch.zeros(batch, 6))


def measure_parts(settings: Settings, folders: ModelFolders, method: str, out: Path) -> dict:
    """Runs inside its own process (`--parts`). Loads the base model as the trainer does, builds the method's step
    module without the face-ID loss, and measures each part (module docstring, 2.)."""
    from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig
    from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from recognizer_archs import IResNet
    from train.config import resolve_config
    from train.fit import IDAdapterTrainingStep
    from train.inv_adapter_step import InvAdapterTrainingStep
    from train.losses import decode_latents
    from train.models import load_base_model

    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    weight_dtype = torch.bfloat16 if settings.mixed_precision == "bf16" else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=weight_dtype is not None)
    config = resolve_config(None, dict(cache="unused", output_dir="unused", pretrained=str(folders.base),
                                       clip_vision=str(folders.clip_vision), face_id_weight=0.0, method=method))
    base = load_base_model(config)
    clip_config = CLIPVisionConfig.from_pretrained(folders.clip_vision)
    stages, widths, face_dim = QUICK_IRESNET if settings.quick else IRESNET100
    with torch.device("meta"):
        clip_params = list(CLIPVisionModelWithProjection(clip_config).parameters())
        recognizer_params = list(IResNet(stages, widths, face_dim).parameters())
    patches = (clip_config.image_size // clip_config.patch_size) ** 2
    torch.manual_seed(0)
    if method == "idadapter":
        adapter = IDAdapter(IDAdapterConfig(
            layout=base.layout, num_refs=NUM_REFS, clip_embed_dim=clip_config.projection_dim,
            mff=MFFConfig(clip_dim=clip_config.hidden_size, face_dim=face_dim, num_patches=patches)))
        step = IDAdapterTrainingStep(adapter, base, None, 0.0)

        def make_batch(batch: int, resolution: int):
            return synthetic_idadapter_batch(base, batch, resolution, face_dim, clip_config.hidden_size, patches,
                                             clip_config.projection_dim)
    else:
        adapter = InvAdapter(InvAdapterConfig(base.layout))
        step = InvAdapterTrainingStep(adapter, base, "noised", 1)

        def make_batch(batch: int, resolution: int):
            return synthetic_inv_adapter_batch(base, batch, resolution)

    step.train()
    trainable = list(adapter.parameters())
    parts = dict(
        device=settings.device, activation_dtype="bf16" if weight_dtype is not None else "fp32",
        frozen_gib_fp32=dict(
            unet=tensor_gib(base.unet.parameters()), text_encoders=tensor_gib(p for m in base.text.modules()
                                                                            for p in m.parameters()),
            vae=tensor_gib(base.vae.parameters()),
            clip_vision=tensor_gib(clip_params) if method == "idadapter" else 0.0,
            face_recognizer=tensor_gib(recognizer_params) if method == "idadapter" else 0.0),
        trainable_params=sum(p.numel() for p in trainable), trainable_gib=tensor_gib(trainable),
        steps=[], decode=[])
    for module in (base.unet, *base.text.modules()):  # as train.fit.build_training_step places them
        module.to(device) if weight_dtype is None else module.to(device, weight_dtype)
    base.vae.to(device)
    adapter.to(device)

    def save() -> None:
        out.write_text(json.dumps(parts, indent=2))

    def training_step(batch: int, checkpointing: bool, resolution: int) -> None:
        entry = dict(batch=batch, gradient_checkpointing=checkpointing, resolution=resolution)
        parts["steps"].append(entry)
        if not checkpointing and not settings.quick:  # the activations all stay: skip what cannot fit the cap
            counted = meta_step(settings.base, resolution, batch, torch.float32, method)["saved_gib"]
            expected = rss_bytes(os.getpid()) / GIB + 1.2 * counted + parts["trainable_gib"]
            if expected > settings.memory_cap_gib:
                entry["skipped"] = f"skipped: would need about {expected:.1f} GiB of RAM (cap {settings.memory_cap_gib:g})"
                save()
                return
        base.unet.enable_gradient_checkpointing() if checkpointing else base.unet.disable_gradient_checkpointing()
        adapter.zero_grad(set_to_none=True)
        inputs = on_device(make_batch(batch, resolution), device)
        with PeakMemory(device) as peak:
            with autocast:
                losses = step(inputs)
            losses["loss"].backward()
        step.release()
        entry.update(peak_above_models_gib=peak.above_start_gib, seconds=peak.seconds,
                     loss=float(losses["loss"].detach()),
                     gradients_gib=tensor_gib(p.grad for p in trainable if p.grad is not None))
        del losses
        save()
        log.info("step b%d gc=%s %d px: +%.2f GiB, %.0f s", batch, checkpointing, resolution,
                 peak.above_start_gib, peak.seconds)

    def face_id_decode(batch: int, checkpointing: bool, resolution: int) -> None:
        base.vae.enable_gradient_checkpointing() if checkpointing else base.vae.disable_gradient_checkpointing()
        latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device, requires_grad=True)
        with PeakMemory(device) as peak:
            with autocast:
                decode_latents(base.vae, latents).mean().backward()
        parts["decode"].append(dict(batch=batch, gradient_checkpointing=checkpointing, resolution=resolution,
                                    peak_above_models_gib=peak.above_start_gib, seconds=peak.seconds))
        save()
        log.info("decode b%d gc=%s: +%.2f GiB, %.0f s", batch, checkpointing, peak.above_start_gib, peak.seconds)

    # smallest first: a run the cap kills leaves what was measured before it. The first step of a process allocates
    # for good what later ones reuse (measured: +4.8 GiB at batch 1, then +1.9 GiB at batch 2): a warm-up, not kept
    low = settings.parts_resolution
    training_step(1, True, low)
    parts["steps"].clear()
    for checkpointing in (True, False):
        for batch in settings.measure_batches:
            training_step(batch, checkpointing, low)
    parts["optimizer"] = optimizer_state(trainable)
    adapter.zero_grad(set_to_none=True)
    save()
    if method == "idadapter":
        for checkpointing in (True, False):
            for batch in settings.measure_batches:
                face_id_decode(batch, checkpointing, low)
    training_step(1, True, settings.resolution)
    return parts


def on_device(batch, device: torch.device):
    """A batch dataclass with its tensors (and dicts of tensors) moved to `device`."""
    from dataclasses import fields, replace

    moved = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if torch.is_tensor(value):
            moved[f.name] = value.to(device)
        elif isinstance(value, dict):
            moved[f.name] = {k: v.to(device) for k, v in value.items()}
    return replace(batch, **moved)


def optimizer_state(trainable: list[torch.nn.Parameter]) -> dict:
    """Bytes of Adam's state after one step (gradients of ones), and of bitsandbytes' Adam8bit when it imports."""
    out = {}
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizers: dict[str, Callable[[], torch.optim.Optimizer]] = {"adam": lambda: torch.optim.Adam(trainable, lr=1e-6)}
    try:
        import bitsandbytes

        optimizers["adam8bit"] = lambda: bitsandbytes.optim.Adam8bit(trainable, lr=1e-6)
        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception as err:  # a missing or broken install: report it, measure Adam alone
        out["bitsandbytes"] = f"not importable ({type(err).__name__})"
    snapshot = [p.detach().clone() for p in trainable]
    for name, make in optimizers.items():
        optimizer = make()
        optimizer.step()
        out[f"{name}_state_gib"] = tensor_gib(v for state in optimizer.state.values() for v in state.values()
                                              if torch.is_tensor(v))
        del optimizer
        with torch.no_grad():
            for p, original in zip(trainable, snapshot):
                p.copy_(original)
    return out


# ---- 3. counted on the meta device -------------------------------------------------------------------------------

class AttentionMatrices(TorchDispatchMode):
    """Records the storages of attention probabilities: softmax outputs and the copies and views made of them. On the
    meta device attention runs as matmuls around a softmax and saves these (B, heads, queries, keys) matrices, which
    the fused kernels of CPUs and GPUs (flash, memory-efficient) recompute instead of keeping."""

    DERIVED = ("_to_copy", "clone", "view", "_unsafe_view", "expand", "reshape", "contiguous", "transpose", "t")

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        derived = name in self.DERIVED and any(
            torch.is_tensor(a) and a.untyped_storage()._cdata in self.storages for a in args)
        if (name in ("_softmax", "_safe_softmax") or derived) and torch.is_tensor(out):
            self.storages.add(out.untyped_storage()._cdata)
        return out


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (activations), each storage once, parameters excluded, and
    attention probabilities excluded unless `keep_attention` (`AttentionMatrices`)."""

    def __init__(self, exclude: list[torch.Tensor], keep_attention: bool = False) -> None:
        self.excluded = {p.untyped_storage()._cdata for p in exclude}
        self.attention = AttentionMatrices()
        self.keep_attention = keep_attention
        self.seen: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
        attention_matrix = not self.keep_attention and key in self.attention.storages
        if key not in self.excluded and not attention_matrix:
            self.seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def gib(self) -> float:
        return sum(self.seen.values()) / GIB


def meta_step(base: str, resolution: int, batch: int = 1, dtype: torch.dtype = torch.float32,
              method: str = "idadapter", full_unet: bool = False) -> dict:
    """One training step's UNet part on the meta device: the adapter's encoders (IDAdapter: MFF + identity MLP on
    N ViT-H references), the UNet with the method's binding, MSE, backward. Returns its FLOPs (count_flops) and the
    saved-for-backward bytes, and the parameter counts. `full_unet`: the UNet trained itself, no adapter (the
    utilisation reference). Text encoders are left out here (77 tokens: < 1 % of the step, train_throughput)."""
    from diffusers import UNet2DConditionModel

    from idadapter_core import IDAdapter, IDAdapterConfig, MFFConfig
    from idadapter_core.hosts import DiffusersIDAdapter, DiffusersInvAdapter, layout_from_diffusers_unet
    from idadapter_core.inv_adapter import InvAdapter, InvAdapterConfig

    spec = BASES[base]
    meta = torch.device("meta")
    latent = resolution // 8
    context_dim = sum(t["hidden_size"] for t in spec.texts)
    widths = {"l": spec.texts[0]["hidden_size"]} if len(spec.texts) == 1 else {
        "l": spec.texts[0]["hidden_size"], "g": spec.texts[1]["hidden_size"]}
    with meta:
        unet = UNet2DConditionModel(sample_size=latent, **spec.unet).to(dtype)
        unet_params = sum(p.numel() for p in unet.parameters())
        layout = layout_from_diffusers_unet(unet, text_widths=widths)
        patches = (VIT_H["image_size"] // VIT_H["patch_size"]) ** 2
        if method == "idadapter":
            adapter = IDAdapter(IDAdapterConfig(layout=layout, num_refs=NUM_REFS, clip_embed_dim=VIT_H["projection_dim"],
                                                mff=MFFConfig(clip_dim=VIT_H["hidden_size"], face_dim=512,
                                                              num_patches=patches)))
        else:
            adapter = InvAdapter(InvAdapterConfig(layout))
    adapter.to(dtype)  # on the meta device there is no autocast: everything in `dtype`
    unet.requires_grad_(full_unet)
    adapter.requires_grad_(not full_unet)
    added = None
    if "addition_embed_type" in spec.unet:
        added = {"text_embeds": torch.randn(batch, spec.texts[1]["projection_dim"], device=meta, dtype=dtype),
                 "time_ids": torch.randn(batch, 6, device=meta, dtype=dtype)}
    context = torch.randn(batch, TEXT_TOKENS, context_dim, device=meta, dtype=dtype, requires_grad=not full_unet)
    noisy = torch.randn(batch, 4, latent, latent, device=meta, dtype=dtype)
    timesteps = torch.full((batch,), 500, device=meta)
    if full_unet:
        binding = None
    elif method == "idadapter":
        binding = DiffusersIDAdapter(unet, adapter)
    else:
        binding = DiffusersInvAdapter(unet, adapter)
    saved = SavedBytes([*unet.parameters(), *adapter.parameters()])

    def step() -> None:
        with saved.attention, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            if binding is not None and method == "idadapter":
                embeds = adapter.encode(
                    torch.randn(batch, NUM_REFS, patches, VIT_H["hidden_size"], device=meta, dtype=dtype),
                    torch.randn(batch, NUM_REFS, 512, device=meta, dtype=dtype),
                    torch.randn(batch, NUM_REFS, VIT_H["projection_dim"], device=meta, dtype=dtype))
                binding.set_identity(embeds.reference_tokens)
            elif binding is not None:
                with torch.no_grad():  # the reference pass records each block's self-attention input
                    binding.set_reference(binding.record_reference(noisy, timesteps, context.detach(),
                                                                   added_cond_kwargs=added))
            out = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(out.float(), torch.randn(out.shape, device=meta)).backward()

    flops = count_flops(step)
    return dict(gflops=flops / 1e9, saved_gib=saved.gib, unet_params=unet_params,
                adapter_params=sum(p.numel() for p in adapter.parameters()))


def vae_decode_gflops(resolution: int) -> float:
    """The face-ID gate's decode of x̂0 (forward, batch 1), counted on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(sample_size=resolution, **SD_VAE).requires_grad_(False)
        latents = torch.randn(1, 4, resolution // 8, resolution // 8)
    with torch.no_grad():
        return count_flops(lambda: vae.decode(latents)) / 1e9


def decode_saved_gib(resolution: int) -> float:
    """The face-ID loss's decode with gradients (fp32, as the trainer keeps the VAE), batch 1: saved-for-backward
    bytes counted on the meta device, all of them (its one attention matrix, 4096² at 512 px, included)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(sample_size=resolution, **SD_VAE).requires_grad_(False)
        latents = torch.randn(1, 4, resolution // 8, resolution // 8, requires_grad=True)
    saved = SavedBytes(list(vae.parameters()), keep_attention=True)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        vae.decode(latents).sample.mean().backward()
    return saved.gib


def count_on_meta(settings: Settings) -> dict:
    """FLOPs and saved bytes of every base at its resolution, and the utilisation reference."""
    counted: dict = {}
    for base, spec in BASES.items():
        res = settings.resolution if base == settings.base else spec.resolution
        entry = counted[base] = {"resolution": res, "decode_gflops": vae_decode_gflops(res),
                                 "decode_saved_gib_fp32": decode_saved_gib(res)}
        for method in settings.methods:
            entry[method] = {dtype_name: meta_step(base, res, 1, dtype, method)
                             for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        if base == settings.base:
            entry["half_resolution_fp32"] = meta_step(base, res // 2, 1, torch.float32, settings.methods[0])
    counted["reference_full_unet_sd21_512"] = meta_step("sd21", 512, 1, torch.bfloat16, full_unet=True)
    return counted


# ---- 4. projections ----------------------------------------------------------------------------------------------

GPUS = {"A100": 312e12, "H100 SXM": 989e12}
"""Dense bf16 tensor-core peaks, FLOP/s (NVIDIA's A100 and H100 datasheets; H100's 1,979 is with sparsity)."""
REFERENCE_IMAGES_PER_S = 290 / 8
"""MosaicML's SD2-base UNet training at 512 px on 8 A100s (github.com/mosaicml/diffusion README), per GPU."""
CARDS_GIB = (24, 40, 80)
CUDA_OVERHEAD_GIB = 1.0
"""CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack: assumed, not measured (no GPU here)."""
PAPER_STEPS, PAPER_BATCH = 50_000, 4
PROJECTED_BATCHES = (1, 2, 4, 8)


def linear_fit(points: dict[int, float]) -> tuple[float, float]:
    """(intercept, per-sample slope) through the batch sizes measured."""
    batches = sorted(points)
    if len(batches) == 1:
        return 0.0, points[batches[0]] / batches[0]
    slope = (points[batches[-1]] - points[batches[0]]) / (batches[-1] - batches[0])
    return points[batches[0]] - slope * batches[0], slope


def activation_resolution_scale(steps: list[dict], low: int, high: int) -> float:
    """Measured: activations of the batch-1 step with gradient checkpointing at `high` ÷ at `low` (the pixel ratio
    when the step at `high` was not measured)."""
    def activation(resolution: int) -> float | None:
        for s in steps:
            if s["batch"] == 1 and s["gradient_checkpointing"] and s["resolution"] == resolution:
                return s["peak_above_models_gib"] - s["gradients_gib"]
        return None

    at_low, at_high = activation(low), activation(high)
    return at_high / at_low if at_low and at_high else (high / low) ** 2


def utilisation(counted: dict) -> float:
    """Model FLOPs utilisation of MosaicML's measured throughput (their step: the full UNet's forward, backward
    and weight gradients, counted here)."""
    return REFERENCE_IMAGES_PER_S * counted["reference_full_unet_sd21_512"]["gflops"] * 1e9 / GPUS["A100"]


def project(parts: dict, counted: dict, base: str, method: str) -> dict:
    """GPU memory per batch and option set (bf16 autocast: UNet and text encoders in bf16, the rest fp32), from the
    parts measured for `parts`' base, scaled to `base` through the meta counts when they differ (SDXL)."""
    measured_base = parts["base"]
    steps = [s for s in parts["steps"] if "peak_above_models_gib" in s]
    low = [s for s in steps if s["resolution"] == parts["parts_resolution"]]
    own = counted[measured_base][method]
    bf16_ratio = own["bf16"]["saved_gib"] / own["fp32"]["saved_gib"] if parts.get("activation_dtype") != "bf16" else 1.0
    target = counted[base][method]
    base_scale = target["bf16"]["saved_gib"] / own["bf16"]["saved_gib"]
    resolution_scale = activation_resolution_scale(steps, parts["parts_resolution"], parts["resolution"])
    activations = {}
    for checkpointing in (False, True):
        points = {s["batch"]: s["peak_above_models_gib"] - s["gradients_gib"] for s in low
                  if s["gradient_checkpointing"] == checkpointing}
        if points:
            factor = bf16_ratio * resolution_scale * base_scale
            activations[checkpointing] = tuple(v * factor for v in linear_fit(points))
    decode = {}
    pixels = (counted[base]["resolution"] / parts["parts_resolution"]) ** 2
    if not parts["decode"]:  # not measured: the counted saved bytes, no checkpointing (the most it can take)
        decode = dict.fromkeys((False, True), (0.0, counted[base]["decode_saved_gib_fp32"]))
    for checkpointing in ((False, True) if parts["decode"] else ()):
        # a mode not measured takes the other's numbers (said in the summary's `decode_modes_measured`)
        measured = [d for d in parts["decode"] if d["gradient_checkpointing"] == checkpointing] or parts["decode"]
        points = {d["batch"]: d["peak_above_models_gib"] * pixels for d in measured}
        decode[checkpointing] = linear_fit(points) if points else (0.0, 0.0)
    frozen = parts["frozen_gib_fp32"]
    frozen_scale = target["fp32"]["unet_params"] / own["fp32"]["unet_params"]
    text_scale = sum(t["hidden_size"] ** 2 * t["num_hidden_layers"] for t in BASES[base].texts) / sum(
        t["hidden_size"] ** 2 * t["num_hidden_layers"] for t in BASES[measured_base].texts)
    frozen_gib = (frozen["unet"] * frozen_scale + frozen["text_encoders"] * text_scale) / 2 + frozen["vae"] + \
        frozen["clip_vision"] + frozen["face_recognizer"]
    trainable_gib = parts["trainable_gib"] * target["fp32"]["adapter_params"] / own["fp32"]["adapter_params"]
    optimizer = parts["optimizer"]
    adam_per_gib = {"adam": optimizer["adam_state_gib"] / parts["trainable_gib"]}
    if "adam8bit_state_gib" in optimizer:
        adam_per_gib["adam8bit"] = optimizer["adam8bit_state_gib"] / parts["trainable_gib"]
    rows = []
    for optimizer_name, per_gib in adam_per_gib.items():
        for checkpointing in (True, False):
            if checkpointing not in activations:
                continue
            static = frozen_gib + trainable_gib * (2 + per_gib) + CUDA_OVERHEAD_GIB
            act, dec = activations[checkpointing], decode[checkpointing]
            gib = {b: static + act[0] + act[1] * b + (dec[0] + dec[1] * b if method == "idadapter" else 0.0)
                   for b in PROJECTED_BATCHES}
            largest = {card: max([b for b in range(1, 65) if static + act[0] + act[1] * b +
                                  (dec[0] + dec[1] * b if method == "idadapter" else 0.0) <= card], default=0)
                       for card in CARDS_GIB}
            rows.append(dict(base=base, method=method, optimizer=optimizer_name,
                             gradient_checkpointing=checkpointing, static_gib=static, gib_per_batch=gib,
                             largest_batch=largest, activation_gib_per_sample=act[1],
                             measured=base == measured_base))
    return dict(rows=rows, bf16_over_fp32_activations=bf16_ratio, frozen_gib=frozen_gib, trainable_gib=trainable_gib)


def hours(counted: dict, base: str, method: str, mfu: float) -> dict:
    """50k steps x batch 4 at `mfu` of each GPU's peak: the step's FLOPs (adapter step + the face-ID gate's decode
    forward of every sample; a decode with gradients for the samples showing a face adds up to 3x that)."""
    entry = counted[base]
    per_sample = entry[method]["bf16"]["gflops"] + (entry["decode_gflops"] if method == "idadapter" else 0.0)
    total = per_sample * 1e9 * PAPER_STEPS * PAPER_BATCH
    return {gpu: total / (peak * mfu) / 3600 for gpu, peak in GPUS.items()} | {"gflops_per_sample": per_sample}


def summarize(settings: Settings, rehearsal: dict, parts: dict, counted: dict) -> dict:
    mfu = utilisation(counted)
    projections, times = {}, {}
    for method in settings.methods:
        if "frozen_gib_fp32" not in parts.get(method, {}):
            continue
        measured = dict(parts[method], base=settings.base, resolution=settings.resolution,
                        parts_resolution=settings.parts_resolution)
        for base in BASES:
            projections[f"{base}/{method}"] = project(measured, counted, base, method)
            times[f"{base}/{method}"] = hours(counted, base, method, mfu)
    commands = rehearsal.get("commands", [])
    return dict(settings=asdict(settings), torch=torch.__version__, cpu_bf16=bf16_instructions(),
                rehearsal=dict(commands=commands, resume_exact=rehearsal.get("resume_exact", {}),
                               losses_finite=rehearsal.get("losses_finite")),
                parts=parts, counted=counted, utilisation=mfu, projections=projections, hours=times,
                load_average_1min=os.getloadavg()[0])


def print_table(summary: dict) -> None:
    s = summary["settings"]
    print(f"\nReal-size rehearsal: {s['base']}, fit at {s['fit_resolution']} px, batch {s['batch_size']}, N = {NUM_REFS}, "
          f"λ = {FACE_ID_WEIGHT}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, mixed "
          f"precision '{s['mixed_precision']}' (CPU bf16 instructions: {summary['cpu_bf16']}), {s['threads']} "
          f"thread(s), torch {summary['torch']}{', QUICK (tiny models)' if s['quick'] else ''}.\n")
    print(f"{'command':<52}{'seconds':>9}{'peak RSS GiB':>14}{'exit':>6}  note")
    for c in summary["rehearsal"]["commands"]:
        print(f"{c['name']:<52}{c['seconds']:>9.0f}{c['peak_rss_gib']:>14.2f}{c['returncode']:>6}  {c['stopped']}")
    print(f"resume exact (same adapter bytes as the uninterrupted run): {summary['rehearsal']['resume_exact']}; "
          f"losses finite: {summary['rehearsal']['losses_finite']}")
    for method, p in summary["parts"].items():
        if "frozen_gib_fp32" not in p:
            print(f"\n{method}: parts not measured ({p.get('error', '?')})")
            continue
        print(f"\n{method}, parts measured on the CPU in fp32 ({s['base']}):")
        print("  frozen GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in p["frozen_gib_fp32"].items()))
        o = p["optimizer"]
        print(f"  trainable: {p['trainable_params'] / 1e6:.1f} M parameters, {p['trainable_gib']:.2f} GiB (+ the "
              f"same in gradients); Adam state {o['adam_state_gib']:.2f} GiB; 8-bit Adam "
              + (f"{o['adam8bit_state_gib']:.2f} GiB (bitsandbytes {o['bitsandbytes']})" if "adam8bit_state_gib" in o
                 else o["bitsandbytes"]))
        for step in p["steps"]:
            what = f"  step b{step['batch']} {step['resolution']} px gc={'on ' if step['gradient_checkpointing'] else 'off'}"
            if "peak_above_models_gib" in step:
                print(f"{what}: +{step['peak_above_models_gib']:.2f} GiB over the models (of which gradients "
                      f"{step['gradients_gib']:.2f}), {step['seconds']:.0f} s, loss {step['loss']:.4f}")
            else:
                print(f"{what}: {step['skipped']}")
        for d in p["decode"]:
            print(f"  face-ID decode with gradients b{d['batch']} gc={'on ' if d['gradient_checkpointing'] else 'off'}: "
                  f"+{d['peak_above_models_gib']:.2f} GiB, {d['seconds']:.0f} s")
    c = summary["counted"]
    print(f"\nCounted on the meta device (GFLOPs per sample of the adapter step, fwd+bwd; saved activations GiB, bf16):")
    for base in BASES:
        for method in s["methods"]:
            if method in c[base]:
                e = c[base][method]["bf16"]
                print(f"  {base:<5} {c[base]['resolution']:>5} px {method:<12} {e['gflops']:>9.0f} GFLOPs  "
                      f"{e['saved_gib']:>6.2f} GiB saved  UNet {e['unet_params'] / 1e6:.0f} M, adapter "
                      f"{e['adapter_params'] / 1e6:.1f} M;  face-ID gate decode {c[base]['decode_gflops']:.0f} GFLOPs")
    print(f"Utilisation: {summary['utilisation']:.1%} of A100 bf16 peak (MosaicML's SD2-base UNet training, "
          f"{REFERENCE_IMAGES_PER_S:.1f} images/s per A100 at 512 px x "
          f"{c['reference_full_unet_sd21_512']['gflops']:.0f} GFLOPs counted per sample).\n")
    print(f"{'base/method':<20}{'optimizer':<10}{'gc':<5}" + "".join(f"{'GiB b' + str(b):>9}" for b in PROJECTED_BATCHES)
          + "".join(f"{'max b ' + str(g) + 'G':>10}" for g in CARDS_GIB) + f"{'A100 h':>9}{'H100 h':>9}  source")
    for key, projection in summary["projections"].items():
        t = summary["hours"][key]
        for r in projection["rows"]:
            print(f"{key:<20}{r['optimizer']:<10}{'on' if r['gradient_checkpointing'] else 'off':<5}"
                  + "".join(f"{r['gib_per_batch'][b]:>9.1f}" for b in PROJECTED_BATCHES)
                  + "".join(f"{r['largest_batch'][g]:>10}" for g in CARDS_GIB)
                  + f"{t['A100']:>9.1f}{t['H100 SXM']:>9.1f}  "
                  + ("parts measured (fp32 CPU, bf16 by counted ratio)" if r["measured"] else
                     "projected from counts and the measured base"))
    print(f"\nGiB include {CUDA_OVERHEAD_GIB:g} GiB assumed for CUDA context and workspaces, the face-ID decode of every "
          "sample (worst case: a face in every x̂0) for IDAdapter, and fp32 adapter weights, gradients and optimizer "
          f"state. Hours: {PAPER_STEPS} steps x batch {PAPER_BATCH} at the utilisation above (gradient "
          "checkpointing's recomputation not included). Load average (1 min) at the end: "
          f"{summary['load_average_1min']:.1f} on {os.cpu_count()} CPUs.")


# ---- main --------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the trainer's tiny models: a smoke run in about a minute")
    parser.add_argument("--base", choices=("sd15", "sd21"), default="sd15", help="base model built and run (default sd15)")
    parser.add_argument("--methods", nargs="+", choices=("idadapter", "inv-adapter"),
                        default=["idadapter", "inv-adapter"])
    parser.add_argument("--rehearse", nargs="*", choices=("idadapter", "inv-adapter"),
                        help="methods whose trainer commands run (default: --methods)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of each fit (default 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the rehearsal's fit (default 1)")
    parser.add_argument("--resolution", type=int, help="training resolution (default 512; 64 with --quick)")
    parser.add_argument("--fit-resolution", type=int,
                        help="resolution of the rehearsal's fit and eval (default: --resolution)")
    parser.add_argument("--parts-resolution", type=int,
                        help="resolution of the parts' batch 1 and 2 measurements (default 256; 32 with --quick)")
    parser.add_argument("--memory-cap-gib", type=float, default=11.0,
                        help="kill a command whose RSS passes this (default 11)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every process (default 2)")
    parser.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                        help="fit's mixed precision (default auto: bf16 where the CPU or GPU has bf16 arithmetic)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    parser.add_argument("--skip", nargs="*", default=[], choices=("rehearsal", "parts"),
                        help="leave out the trainer's commands or the parts' measurement")
    parser.add_argument("--assets", type=Path, default=SHARED_ASSETS,
                        help="real photos and the real detector (default ../shared/assets)")
    parser.add_argument("--workdir", type=Path, help="keep the model folders and runs here (default: a temp folder)")
    parser.add_argument("--parts", help=argparse.SUPPRESS)  # internal: measure one method's parts, JSON to this path
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if cuda_bf16 or bf16_instructions() else "no"


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(base=args.base, methods=tuple(args.methods), rehearse=tuple(args.rehearse or args.methods),
                    quick=args.quick, steps=args.steps,
                    batch_size=args.batch_size, resolution=args.resolution or (64 if args.quick else 512),
                    parts_resolution=args.parts_resolution or (32 if args.quick else 256),
                    fit_resolution=args.fit_resolution or args.resolution or (64 if args.quick else 512),
                    memory_cap_gib=args.memory_cap_gib, threads=args.threads,
                    mixed_precision=resolve_mixed_precision(args.mixed_precision),
                    device="cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def measure_parts_in_subprocess(args: argparse.Namespace, settings: Settings, folders: ModelFolders,
                                workdir: Path) -> dict:
    """Each method's parts in a process of its own, its RSS capped; partial results survive a kill."""
    parts = {}
    for method in settings.methods:
        out = workdir / f"parts-{method}.json"
        out.unlink(missing_ok=True)
        command = python("-m", "bench.real_scale", *forwarded_flags(args), "--methods", method,
                         "--workdir", str(workdir), "--parts", str(out))
        result = run_command(f"parts: {method}", command, settings.memory_cap_gib, workdir / f"parts-{method}.log",
                             env={"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(settings.threads)})
        parts[method] = json.loads(out.read_text()) if out.is_file() else {}
        if result.returncode != 0:
            parts[method]["error"] = f"exit {result.returncode} {result.stopped}: {result.tail[-300:]}"
    return parts


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--base", args.base, "--threads", str(args.threads), "--memory-cap-gib", str(args.memory_cap_gib),
             "--assets", str(args.assets)]
    for flag in ("quick", "cpu"):
        if getattr(args, flag):
            flags.append(f"--{flag}")
    flags += ["--mixed-precision", args.mixed_precision]
    for flag in ("resolution", "parts_resolution"):
        if getattr(args, flag):
            flags += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return flags


def reuse_or_run(skip: bool, path: Path, run: Callable[[], dict]) -> dict:
    """`run()`, kept as JSON at `path`; skipped, what an earlier run in the same --workdir kept there (or nothing)."""
    if skip:
        return json.loads(path.read_text()) if path.is_file() else {}
    result = run()
    path.write_text(json.dumps(result, indent=2, default=lambda o: asdict(o)))
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    args = parse_args(argv)
    settings = settings_from(args)
    torch.set_num_threads(settings.threads)
    if not (args.assets / DETECTOR).is_file():
        log.error("the real detector %s is missing; pass --assets (the folder holding insightface/ and faces/)",
                  args.assets / DETECTOR)
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        folders = write_models(workdir, settings.base, settings.quick, args.assets)
        if args.parts:
            result = measure_parts(settings, folders, settings.methods[0], Path(args.parts))
            Path(args.parts).write_text(json.dumps(result, indent=2))
            return 0
        rehearsal = reuse_or_run("rehearsal" in args.skip, workdir / "rehearsal.json",
                                 lambda: rehearse(settings, folders, workdir))
        parts = reuse_or_run("parts" in args.skip, workdir / "parts.json",
                             lambda: measure_parts_in_subprocess(args, settings, folders, workdir))
        log.info("counting FLOPs and saved activations on the meta device")
        summary = summarize(settings, rehearsal, parts, count_on_meta(settings))
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
        log.info("wrote %s", args.json)
    failed = any(c["returncode"] != 0 and c["stopped"] != "on purpose" for c in summary["rehearsal"]["commands"])
    return 1 if failed or not all(summary["rehearsal"]["resume_exact"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
