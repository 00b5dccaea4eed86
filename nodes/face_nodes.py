"""Face nodes: Load InsightFace and Extract Face Features. Thin: the work is in `idadapter_core.face`."""
from __future__ import annotations

import logging
import os

from typing import Sequence

import comfy.utils
import cv2
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..idadapter_core.face import (
    CLIP_CROP_SCALE, DEFAULT_SAME_PERSON_THRESHOLD, FACE_CHOICES, FACE_MODEL_NAMES, FILL_MODES, AlignedReference,
    ClipEncoder, as_face_analyzer, available_providers, chosen_face_index, extract_face_features, load_face_analyzer,
)
from .pack_types import CATEGORY, FaceFeaturesType, PackNode

log = logging.getLogger(__name__)

INSIGHTFACE_FOLDER = "insightface"
MORE_IMAGES = tuple(f"image_{i}" for i in range(2, 17))
"""Names of Extract Face Features' optional photo inputs after `image` (ComfyUI shows one more as each is linked)."""


def register_insightface_folder() -> None:
    """`models/insightface`, the folder the IPAdapter, InstantID and PuLID packs load from (so users' existing
    files work); paths already set for it in extra_model_paths.yaml are kept."""
    if INSIGHTFACE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(
            INSIGHTFACE_FOLDER, os.path.join(folder_paths.models_dir, INSIGHTFACE_FOLDER), is_default=True
        )


register_insightface_folder()


def insightface_model_names() -> list[str]:
    """antelopev2 and buffalo_l first, then any other pack found under `<root>/models/`, and packs unzipped one level
    too high (`<root>/<name>/*.onnx`), which load with a warning saying where they belong (`find_model_dir`)."""
    found = set()
    for root in folder_paths.get_folder_paths(INSIGHTFACE_FOLDER):
        models = os.path.join(root, "models")
        if os.path.isdir(models):
            found.update(entry for entry in os.listdir(models) if os.path.isdir(os.path.join(models, entry)))
        if os.path.isdir(root):
            found.update(
                entry for entry in os.listdir(root)
                if entry != "models" and any(f.endswith(".onnx") for f in _files(os.path.join(root, entry)))
            )
    return [*FACE_MODEL_NAMES, *sorted(found - set(FACE_MODEL_NAMES))]


def _files(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def comfy_clip_encoder(clip_vision) -> ClipEncoder:
    """ComfyUI's CLIP_VISION as the core's CLIP callable: the 224 crops go in unchanged (crop=False; ComfyUI's
    clip_preprocess resizes to the model's size and normalises)."""

    def encode(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = clip_vision.encode_image(crops, crop=False)
        return output.penultimate_hidden_states, output.image_embeds

    return encode


def reference_images(image: torch.Tensor, more_images: dict[str, torch.Tensor] | None) -> tuple[list[torch.Tensor], list[str]]:
    """Every photo of the `image` batch and of the extra inputs, each at its own size, with the name a warning
    gives it: the input's name, and its place in the batch when the batch holds several."""
    inputs = [("image", image), *((name, more_images[name]) for name in MORE_IMAGES if name in (more_images or {}))]
    images, names = [], []
    for name, batch in inputs:
        for index, single in enumerate(batch):
            images.append(single)
            names.append(name if len(batch) == 1 else f"{name} {index + 1}/{len(batch)}")
    return images, names


def draw_references(references: Sequence[AlignedReference], arcface_scale: float = CLIP_CROP_SCALE) -> np.ndarray:
    """(N, 224, 224, 3) uint8: each CLIP crop with its 5 landmarks and the ArcFace crop's square drawn on it."""
    colours = [(0, 255, 0), (0, 255, 0), (255, 64, 64), (64, 160, 255), (64, 160, 255)]
    out = []
    for reference in references:
        canvas = reference.clip_crop.copy()
        size = canvas.shape[0]
        inner = size / arcface_scale
        corner = int(round((size - inner) / 2))
        cv2.rectangle(canvas, (corner, corner), (size - 1 - corner, size - 1 - corner), (255, 255, 255), 1)
        for (x, y), colour in zip(reference.clip_landmarks, colours):
            cv2.circle(canvas, (int(round(x)), int(round(y))), 3, colour, -1, lineType=cv2.LINE_AA)
        out.append(canvas)
    return np.stack(out)


class LoadInsightFace(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDAdapterLoadInsightFace",
            display_name="Load InsightFace",
            category=CATEGORY,
            description="Loads an insightface model pack (face detector + ArcFace recognizer) from "
                        "models/insightface/models/<name>/. Never downloads.",
            inputs=[
                io.Combo.Input(
                    "model_name", options=insightface_model_names(), default=FACE_MODEL_NAMES[0],
                    tooltip="The pack folder in models/insightface/models/: antelopev2 or buffalo_l (512-d ArcFace). "
                            "Use the one the IDAdapter weights were trained with.",
                ),
                io.Combo.Input(
                    "provider", options=available_providers(), default="CPU",
                    tooltip="onnxruntime device. Only installed providers are listed; a saved workflow naming one "
                            "that is not installed here runs on CPU with a warning.",
                ),
                io.Int.Input(
                    "det_size", default=640, min=128, max=1280, step=32,
                    tooltip="Detection input size. When no face is found, smaller sizes are tried too (a face "
                            "filling the frame is found at a small size, a small face in a big photo needs a large one).",
                ),
            ],
            outputs=[io.FaceAnalysis.Output()],
        )

    @classmethod
    def validate_inputs(cls, provider: str) -> bool:
        # Naming `provider` here turns off ComfyUI's "value not in list" check for it: a workflow saved on a
        # machine with CUDA must still run here, on CPU (load_face_analyzer warns).
        return True

    @classmethod
    def execute(cls, model_name: str, provider: str, det_size: int) -> io.NodeOutput:
        roots = folder_paths.get_folder_paths(INSIGHTFACE_FOLDER)
        return io.NodeOutput(load_face_analyzer(roots, model_name, provider, det_size))


class ExtractFaceFeatures(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDAdapterExtractFaceFeatures",
            display_name="Extract Face Features",
            category=CATEGORY,
            description="Detects and aligns one face per reference photo (any size; link more photos to the extra "
                        "inputs) and computes the ArcFace embeddings and CLIP features of N references for Encode "
                        "Identity. Photos without a usable face are skipped with a warning; another warning names any "
                        "face that does not look like the same person as the others.",
            inputs=[
                io.FaceAnalysis.Input("face_analysis", tooltip="From Load InsightFace."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="From Load CLIP Vision: the model the IDAdapter weights name (ViT-H-14)."),
                io.Image.Input("image", tooltip="A photo of the person, or a batch of same-size photos."),
                io.Autogrow.Input(
                    "more_images", optional=True,
                    template=io.Autogrow.TemplateNames(
                        io.Image.Input("image", tooltip="Another photo of the same person, at its own size."),
                        names=list(MORE_IMAGES), min=0,
                    ),
                    tooltip="More photos of the person, any size and orientation, each used as it is (Batch Images "
                            "would crop them all to the first one's shape); another input appears as each is linked.",
                ),
                io.Int.Input("num_refs", default=4, min=1, max=16,
                             tooltip="N, the number of references the identity is built from (the paper uses 4)."),
                io.Combo.Input(
                    "fill_mode", options=list(FILL_MODES), default="replicate",
                    tooltip="With fewer usable images than N: 'replicate' repeats them (the paper's inference), "
                            "'augment' adds flipped / rotated / colour-jittered copies (its training augmentation).",
                ),
                io.Combo.Input(
                    "face", options=list(FACE_CHOICES), default=FACE_CHOICES[0],
                    tooltip="Which face of a photo with several: the largest, or the face_index-th counted left to "
                            "right (to take one person of a group photo).",
                ),
                io.Int.Input("face_index", default=0, min=0, max=63,
                             tooltip="With face 'left to right': 0 is the leftmost face, 1 the next, ... A photo "
                                     "holding fewer faces is skipped with a warning saying how many it holds."),
                io.Int.Input("min_face_size", default=64, min=0, max=2048, advanced=True,
                             tooltip="Faces whose box is smaller than this many pixels are not used."),
                # The frontend gives an INT named seed "control after generate: randomize" unless told otherwise,
                # which would re-run detection, CLIP and MFF at every queue. A plain "fixed" string
                # (io.ControlAfterGenerate.fixed from ComfyUI 0.13) so that older hosts accept it too.
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, advanced=True, control_after_generate="fixed",
                             tooltip="Seed of the 'augment' fill mode's random flips, rotations and colours."),
                io.Float.Input(
                    "same_person_threshold", default=DEFAULT_SAME_PERSON_THRESHOLD, min=-1.0, max=1.0, step=0.01,
                    optional=True, advanced=True,
                    tooltip="A warning names any photo whose face's ArcFace similarity to the other photos' person "
                            "is below this (measured: one person 0.65 and up, different people 0.1 and below). "
                            "-1 turns the check off.",
                ),
            ],
            outputs=[
                FaceFeaturesType.Output(display_name="FACE_FEATURES"),
                io.Image.Output(display_name="aligned_faces",
                                tooltip="The CLIP crops of the N references with landmarks and the ArcFace square drawn."),
            ],
        )

    @classmethod
    def execute(cls, face_analysis, clip_vision, image: torch.Tensor, num_refs: int, fill_mode: str,
                face_index: int, min_face_size: int, seed: int, more_images: io.Autogrow.Type = None,
                same_person_threshold: float = DEFAULT_SAME_PERSON_THRESHOLD,
                face: str = FACE_CHOICES[0]) -> io.NodeOutput:
        face_analysis = as_face_analyzer(face_analysis)
        images, names = reference_images(image, more_images)
        progress = comfy.utils.ProgressBar(len(images))
        features, references = extract_face_features(
            face_analysis, images, comfy_clip_encoder(clip_vision), num_refs=num_refs, fill_mode=fill_mode,
            face_index=chosen_face_index(face, face_index), min_face_size=min_face_size, seed=seed,
            image_names=names, on_progress=lambda done, total: progress.update_absolute(done, total),
            same_person_threshold=same_person_threshold,
        )
        preview = torch.from_numpy(draw_references(references)).float() / 255.0
        return io.NodeOutput(features, preview)


FACE_NODES = [LoadInsightFace, ExtractFaceFeatures]
