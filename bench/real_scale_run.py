"""The real-size rehearsal's settings, and the trainer's own commands run in subprocesses with their wall time and
peak memory (bench/real_scale.py, step 1): `prepare`, `fit` straight and killed after its first checkpoint then
resumed (the two must end with the same adapter bytes), `export`, `eval`."""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench.common import FACE_ID_WEIGHT, GIB, NUM_REFS, REPO_ROOT
from train.real_size_models import FACE_PACK, ModelFolders

log = logging.getLogger("real_scale")


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
