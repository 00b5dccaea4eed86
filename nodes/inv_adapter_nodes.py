"""Inv-Adapter nodes: load weights, invert a reference, apply it to a MODEL. Thin: the work is in
`idadapter_core.inv_adapter` and `inv_adapter_binding`."""
from __future__ import annotations

import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..idadapter_core.face import as_face_analyzer
from ..idadapter_core.inv_adapter import load_inv_adapter
from ..idadapter_core.schedule import BLOCK_MODES, NEGATIVE_IDENTITY_MODES
from .comfy_binding import load_adapter_for_comfy, register_weights_folder
from .inv_adapter_binding import apply_inv_adapter, crop_reference_face, invert_reference
from .pack_types import (
    CATEGORY, InvAdapterType, InvReferenceType, PackNode, identity_in_negative_input, strength_and_schedule_inputs,
)

MODEL_FOLDER = "inv_adapter"


register_weights_folder(MODEL_FOLDER)


class LoadInvAdapter(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterLoader",
            display_name="Load Inv-Adapter",
            category=CATEGORY,
            description="Loads Inv-Adapter weights (the Embedded Attention Adapter, .safetensors) from models/inv_adapter.",
            inputs=[
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(MODEL_FOLDER),
                               tooltip="Inv-Adapter weights in models/inv_adapter; they name the base model they were trained for."),
            ],
            outputs=[InvAdapterType.Output(display_name="INV_ADAPTER")],
        )

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(MODEL_FOLDER, adapter_name)
        return io.NodeOutput(load_adapter_for_comfy(path, adapter_name, load_inv_adapter))


class InvertReference(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterInvertReference",
            display_name="Invert Reference (Inv-Adapter)",
            category=CATEGORY,
            description="DDIM-inverts the reference face through the same model that will generate, with the empty "
                        "prompt. The result is cached: re-running a graph with the same reference does not invert again.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL you will apply Inv-Adapter to (the reference pass must use the same UNet)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: encodes the reference photo."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP: encodes the empty (null) prompt the inversion runs with."),
                io.Image.Input("image", tooltip="The reference photo, or a batch of photos of one person (the EAA attends to all); with "
                                                "face_analysis connected, the largest face of each is cropped and aligned."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM inversion steps (UNet evaluations); more follow the noise levels of any sampler more closely."),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="From Load InsightFace: crop the largest face (aligned) instead of inverting the whole photo."),
                io.Int.Input("crop_size", default=512, min=64, max=2048, step=8, advanced=True,
                             tooltip="Side of the face crop in pixels (with face_analysis)."),
                io.Float.Input("crop_scale", default=2.0, min=1.0, max=4.0, step=0.1, advanced=True,
                               tooltip="Face crop width as a multiple of the ArcFace crop's (2.0 shows the whole head, as in aligned "
                                       "face data sets; our choice)."),
            ],
            outputs=[InvReferenceType.Output(display_name="INV_REFERENCE")],
        )

    @classmethod
    def execute(cls, model, vae, clip, image: torch.Tensor, steps: int, face_analysis=None, crop_size: int = 512,
                crop_scale: float = 2.0) -> io.NodeOutput:
        if face_analysis is not None:
            image = crop_reference_face(image, as_face_analyzer(face_analysis), crop_size, crop_scale)
        progress = comfy.utils.ProgressBar(steps)
        reference = invert_reference(model, vae, clip, image, steps, lambda done, total: progress.update_absolute(done, total))
        return io.NodeOutput(reference)


class ApplyInvAdapter(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterApply",
            display_name="Apply Inv-Adapter",
            category=CATEGORY,
            description="Returns a copy of the model that, at each step, runs the inverted reference through the UNet and "
                        "feeds its features into self- and cross-attention through the Embedded Attention Adapter. "
                        "The input model is left untouched.",
            inputs=[
                io.Model.Input("model", tooltip="The same MODEL the reference was inverted with."),
                InvAdapterType.Input("inv_adapter", tooltip="From Load Inv-Adapter."),
                InvReferenceType.Input("reference", tooltip="From Invert Reference."),
                *strength_and_schedule_inputs(
                    (0.0, 2.0), "Scales both of the EAA's branches; 0 turns it off (and skips the reference pass).",
                    acting="the adapter",
                ),
                io.Int.Input("reference_timestep", default=-1, min=-1, max=999, advanced=True,
                             tooltip="-1: the reference pass runs at the same noise level as each step (lock-step). "
                                     "0-999: always at this timestep's point of the inverted trajectory."),
                io.Boolean.Input("cache_features", default=True, advanced=True,
                                 tooltip="Keep each step's reference features, so the next generation skips the reference "
                                         "pass (about 46 MB per step and reference photo for SD1.5 at 512x512 in fp32)."),
                identity_in_negative_input(),
                io.Combo.Input(
                    "blocks", options=list(BLOCK_MODES), default=BLOCK_MODES[0], optional=True, advanced=True,
                    tooltip="'all': the EAA in every transformer block (the paper). 'skip highest resolution': not in "
                            "the blocks of the largest feature maps, which hold most of its cost (README, Speed); not "
                            "part of the paper, so check the likeness.",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, inv_adapter, reference, weight: float, start_at: float, end_at: float, mask=None,
                reference_timestep: int = -1, cache_features: bool = True,
                identity_in_negative: str = NEGATIVE_IDENTITY_MODES[0], blocks: str = BLOCK_MODES[0]) -> io.NodeOutput:
        return io.NodeOutput(apply_inv_adapter(model, inv_adapter, reference, weight, start_at, end_at,
                                               reference_timestep, cache_features, mask, identity_in_negative, blocks))


INV_ADAPTER_NODES = [LoadInvAdapter, InvertReference, ApplyInvAdapter]
