"""What one reference costs in Extract Face Features on CPU: detect, align, ArcFace, CLIP, and each stage's share.

Models: architecture-faithful, random weights (no real weights can be had offline), built here in torch:
  * detector: SCRFD-10G with keypoints (ResNetV1e BasicBlock stages (3, 4, 2, 3) x [56, 88, 88, 224], deep stem,
    PAFPN to 56 channels on strides 8/16/32, per-stride heads of 3 stacked 3x3 convs of 80 channels, 2 anchors),
    exported to ONNX in insightface's 9-output layout and loaded through insightface's FaceAnalysis and router;
  * recognizer: ArcFace IResNet-100 (stages (3, 13, 30, 3), 112x112 -> 512), same route;
  * CLIP: OpenCLIP ViT-H/14's layout as transformers' CLIPVisionModelWithProjection (32 layers, width 1280,
    224 px, 256 patches, projection 1024), through the core's `clip_encoder_from_transformers`.
The random detector finds no faces (its score head is biased off, so its NMS has nothing to do, as with a real
photo of one face); the detection stage times one detection at the chosen size, and alignment runs on fixed
landmarks placed in the photo (insightface's own t1.jpg). ArcFace runs once per reference, CLIP once per
reference in one batch of N (N distinct images, or augmented copies); N references replicated from one photo
(the paper's inference) are also timed end to end, where each stage runs once. Each stage is timed `repeats`
times after a warm-up; the fastest run is reported (other processes only add time), with the
load average, since the machine may be shared.
Where ../shared/assets exists the real stand-in SCRFD-2.5G detector is timed too (one face found), for scale.

Caching: with COMFYUI_PATH set and ComfyUI's python, the graph Load InsightFace -> Extract Face Features ->
Preview Image (stand-in pack from ../shared, a ViT-H/14-layout ComfyUI CLIP_VISION, obama.jpg through Load Image)
runs twice in ComfyUI's own PromptExecutor: the second run's time and the nodes it executed are printed.

The model architectures are train/insightface_archs.py's.
Run: `python -m bench.face_encode [--quick] [--refs N] [--json PATH]`;
     `COMFYUI_PATH=/path/to/ComfyUI <ComfyUI python> -m bench.face_encode` adds the cache measurement.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.comfy_host import import_pack, start_comfyui
from bench.common import SHARED_ASSETS, VIT_H_14_OPENCLIP, best_seconds, count_flops, print_and_write
from idadapter_core.face import (
    DetectedFace, FaceAnalyzer, align_reference, arcface_embeddings, clip_features, load_face_analyzer,
    load_image, to_rgb_uint8,
)
from idadapter_core.hosts import clip_encoder_from_transformers
from train.insightface_archs import (
    IRESNET100_STAGES, SCRFD10G, IResNet, export_like_insightface, export_scrfd_like_insightface,
)
from train.tiny_models import build_clip_vision

log = logging.getLogger("face_encode")


# ---- models ---------------------------------------------------------------------------------------------------

def gmacs(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """Multiply-accumulates (2 FLOPs per MAC), in billions."""
    with torch.no_grad():
        return count_flops(lambda: model(*inputs)) / 2e9


def export_pack(folder: Path) -> dict[str, float]:
    """`folder/` with the SCRFD-10G and IResNet-100 layouts as ONNX (random weights); returns their GMACs."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    detector, recognizer = SCRFD10G().eval(), IResNet(IRESNET100_STAGES).eval()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        export_scrfd_like_insightface(detector, folder / "scrfd_10g_layout.onnx")
        export_like_insightface(recognizer, folder / "iresnet100_layout.onnx")
    return {"detector @640x640": gmacs(detector, torch.zeros(1, 3, 640, 640)),
            "detector @640x480 (VGA)": gmacs(detector, torch.zeros(1, 3, 480, 640)),
            "recognizer": gmacs(recognizer, torch.zeros(1, 3, 112, 112))}


# ---- timing ---------------------------------------------------------------------------------------------------

def fixed_face(image: np.ndarray) -> DetectedFace:
    """Landmarks of a 300 px face in the middle of the photo (the random detector finds none)."""
    height, width = image.shape[:2]
    from insightface.utils.face_align import arcface_dst

    landmarks = (arcface_dst - 56.0) * (300 / 112) + np.array([width / 2, height / 2], np.float32)
    return DetectedFace(0, np.array([width / 2 - 150, height / 2 - 150, width / 2 + 150, height / 2 + 150], np.float32),
                        landmarks.astype(np.float32), 1.0, 1, 640)


def time_stages(analyzer: FaceAnalyzer, encode_clip, image: np.ndarray, refs: int, repeats: int) -> dict[str, float]:
    """Seconds per reference for each stage (CLIP: one batch of `refs` crops, divided by `refs`)."""
    face = fixed_face(image)
    analyzer.detect(image, analyzer.det_size)  # warm-up: insightface builds its session for this size lazily
    references = [align_reference(image, face, analyzer.arcface_size) for _ in range(refs)]
    analyzer.embed(references[0].arcface_crop)
    clip_features(encode_clip, references)
    return {
        "detect": best_seconds(lambda: analyzer.detect(image, analyzer.det_size), repeats),
        "align (ArcFace + CLIP crops)": best_seconds(lambda: align_reference(image, face, analyzer.arcface_size), repeats),
        "ArcFace": best_seconds(lambda: analyzer.embed(references[0].arcface_crop), repeats),
        "CLIP": best_seconds(lambda: clip_features(encode_clip, references), repeats) / refs,
    }


def time_one_photo_replicated(analyzer: FaceAnalyzer, encode_clip, image: np.ndarray, refs: int, repeats: int) -> float:
    """Seconds for N references made from one photo by replication (the paper's inference): each stage runs once."""
    face = fixed_face(image)

    def run() -> None:
        analyzer.detect(image, analyzer.det_size)
        reference = align_reference(image, face, analyzer.arcface_size)
        arcface_embeddings(analyzer, [reference] * refs)
        clip_features(encode_clip, [reference] * refs)

    return best_seconds(run, repeats)


def time_real_detector(image: np.ndarray, repeats: int) -> float | None:
    if not (SHARED_ASSETS / "insightface").is_dir():
        return None
    analyzer = load_face_analyzer(SHARED_ASSETS / "insightface", "standin_scrfd_mbf128", det_size=640)
    found = len(analyzer.detect(image, 640)[0])
    log.info("stand-in SCRFD-2.5G: %d faces in the photo", found)
    return best_seconds(lambda: analyzer.detect(image, 640), repeats)


# ---- ComfyUI cache --------------------------------------------------------------------------------------------

def comfyui_module(name: str):
    """A top-level module of ComfyUI itself (`nodes`, ...), never the pack's folder of the same name: the repository is
    on sys.path (`python -m` runs from its root), so the check makes a wrong resolution fail loudly."""
    module = importlib.import_module(name)
    comfy_root = Path(os.environ["COMFYUI_PATH"]).resolve()
    if Path(module.__file__).resolve().parent != comfy_root:
        raise ImportError(f"'{name}' resolved to {module.__file__}, not ComfyUI's {comfy_root / (name + '.py')}")
    return module


def comfy_cache_runs(work: Path, runs: int = 2) -> list[dict]:
    """Run Load InsightFace -> Extract Face Features -> Preview Image `runs` times in ComfyUI's PromptExecutor."""
    start_comfyui()
    import_pack()
    face_nodes = importlib.import_module("comfyui_idadapter.nodes.face_nodes")
    import comfy.clip_vision
    import execution
    import folder_paths

    comfy_nodes = comfyui_module("nodes")

    class RandomClipVisionH:
        """Load CLIP Vision stand-in: ComfyUI's own ViT-H/14 config with random weights (no file exists offline)."""

        CATEGORY, RETURN_TYPES, FUNCTION = "bench", ("CLIP_VISION",), "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            config = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json"
            clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, parameter in clip_vision.model.named_parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02 if parameter.ndim > 1
                                    else torch.zeros_like(parameter) if name.endswith("bias") else torch.ones_like(parameter))
            return (clip_vision,)

    (work / "insightface" / "models").mkdir(parents=True)
    shutil.copytree(SHARED_ASSETS / "insightface" / "models" / "standin_scrfd_mbf128",
                    work / "insightface" / "models" / "standin_scrfd_mbf128")
    for folder in ("input", "temp"):
        (work / folder).mkdir()
    shutil.copy(SHARED_ASSETS / "faces" / "obama.jpg", work / "input" / "obama.jpg")
    folder_paths.add_model_folder_path("insightface", str(work / "insightface"), is_default=True)
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_temp_directory(str(work / "temp"))
    comfy_nodes.NODE_CLASS_MAPPINGS.update({"IDAdapterLoadInsightFace": face_nodes.LoadInsightFace,
                                      "IDAdapterExtractFaceFeatures": face_nodes.ExtractFaceFeatures,
                                      "BenchRandomClipVisionH": RandomClipVisionH})
    prompt = {
        "1": {"class_type": "IDAdapterLoadInsightFace",
              "inputs": {"model_name": "standin_scrfd_mbf128", "provider": "CPU", "det_size": 640}},
        "2": {"class_type": "BenchRandomClipVisionH", "inputs": {}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "4": {"class_type": "IDAdapterExtractFaceFeatures", "inputs": {
            "face_analysis": ["1", 0], "clip_vision": ["2", 0], "image": ["3", 0], "num_refs": 4,
            "fill_mode": "replicate", "face": "largest", "face_index": 0, "min_face_size": 64, "seed": 0}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }

    class Server:
        client_id, last_node_id, last_prompt_id = None, None, None

        def __init__(self) -> None:
            self.messages = []

        def send_sync(self, event, data, sid=None) -> None:
            self.messages.append((event, data))

    server = Server()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    results = []
    for run in range(runs):
        valid, error, outputs, _ = asyncio.run(execution.validate_prompt(f"run{run}", prompt, None))
        assert valid, error
        server.messages.clear()
        start = time.perf_counter()
        executor.execute(prompt, f"run{run}", {"client_id": "bench"}, outputs)
        seconds = time.perf_counter() - start
        assert executor.success, [m for m in server.messages if m[0] == "execution_error"]
        executed = [d["node"] for e, d in server.messages if e == "executing" and d.get("node")]
        cached = dict(server.messages)["execution_cached"]["nodes"]
        results.append({"run": run + 1, "seconds": seconds, "executed": executed, "cached": sorted(cached)})
    return results


# ---- measure, report ------------------------------------------------------------------------------------------

@dataclass
class Settings:
    refs: int
    """N references in the CLIP batch."""
    repeats: int
    """Timed runs of each stage (the fastest is reported)."""


def measure(settings: Settings) -> dict:
    """Every number the table shows: the models' GMACs, each stage's seconds per reference, and the cache runs."""
    import insightface

    photo = to_rgb_uint8(load_image(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"))
    report: dict = {"cpu_threads": torch.get_num_threads(), **asdict(settings),
                    "load_average": "/".join(f"{v:.1f}" for v in os.getloadavg()),
                    "image": f"insightface t1.jpg {photo.shape[1]}x{photo.shape[0]}"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        report["gmacs"] = export_pack(work / "models" / "bench_scrfd10g_r100")
        analyzer = load_face_analyzer(work, "bench_scrfd10g_r100", "CPU", det_size=640)
        clip = build_clip_vision(VIT_H_14_OPENCLIP)
        report["gmacs"]["CLIP ViT-H/14"] = gmacs(clip, torch.zeros(1, 3, 224, 224))
        report["build_seconds"] = time.perf_counter() - start
        report["embed_dim"] = analyzer.embed_dim
        encode_clip = clip_encoder_from_transformers(clip)
        stages = time_stages(analyzer, encode_clip, photo, settings.refs, settings.repeats)
        report["one_photo_replicated_seconds"] = time_one_photo_replicated(analyzer, encode_clip, photo,
                                                                           settings.refs, settings.repeats)
        del clip, encode_clip
        report["stages_seconds_per_ref"] = stages
        report["real_scrfd_2.5g_detect_seconds"] = time_real_detector(photo, settings.repeats)
        if os.environ.get("COMFYUI_PATH") and (SHARED_ASSETS / "faces").is_dir():
            report["comfyui_cache"] = comfy_cache_runs(work / "comfy")
        else:
            report["comfyui_cache"] = "not measured: needs COMFYUI_PATH, ComfyUI's python and ../shared/assets"
    return report


def print_table(report: dict) -> None:
    stages = report["stages_seconds_per_ref"]
    total = sum(stages.values())
    print(f"\nFace features per reference, CPU ({report['cpu_threads']} torch threads), {report['image']}, "
          f"N = {report['refs']}, best of {report['repeats']}, load average {report['load_average']}")
    print(f"{'stage':<30}{'model (random weights)':<34}{'GMACs':>8}{'ms/ref':>10}{'share':>8}")
    rows = [("detect", "SCRFD-10G layout @640", report["gmacs"]["detector @640x640"]),
            ("align (ArcFace + CLIP crops)", "insightface norm_crop + 224 crop", 0.0),
            ("ArcFace", "IResNet-100 -> 512", report["gmacs"]["recognizer"]),
            ("CLIP", "ViT-H/14 (batch of N) -> 256x1280", report["gmacs"]["CLIP ViT-H/14"])]
    for stage, model, macs in rows:
        print(f"{stage:<30}{model:<34}{macs:>8.2f}{stages[stage] * 1e3:>10.1f}{stages[stage] / total:>8.1%}")
    print(f"{'total':<30}{'':<34}{'':>8}{total * 1e3:>10.1f}{1:>8.0%}")
    print(f"N = {report['refs']} references from one photo by replication (each stage runs once): "
          f"{report['one_photo_replicated_seconds'] * 1e3:.1f} ms in all")
    print(f"(SCRFD-10G layout at VGA 640x480: {report['gmacs']['detector @640x480 (VGA)']:.2f} GMACs; "
          f"ArcFace width read from the recognizer: {report['embed_dim']})")
    if report["real_scrfd_2.5g_detect_seconds"] is not None:
        print(f"for scale, the real stand-in SCRFD-2.5G detector @640: {report['real_scrfd_2.5g_detect_seconds'] * 1e3:.1f} ms")
    cache = report["comfyui_cache"]
    if isinstance(cache, str):
        print(f"ComfyUI cache: {cache}")
    else:
        print("ComfyUI cache (PromptExecutor, stand-in pack + ViT-H/14-layout CLIP_VISION, obama.jpg, N = 4):")
        for run in cache:
            print(f"  run {run['run']}: {run['seconds'] * 1e3:10.1f} ms, executed {run['executed'] or 'nothing'}, "
                  f"served from cache {run['cached'] or 'nothing'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and references (a smoke run)")
    parser.add_argument("--refs", type=int, default=None, help="N references in the CLIP batch (default 4; 2 quick)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    report = measure(Settings(refs=options.refs or (2 if options.quick else 4), repeats=2 if options.quick else 5))
    print_and_write(report, print_table, options.json)


if __name__ == "__main__":
    main()
