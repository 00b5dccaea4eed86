"""IDAdapter nodes: load weights, encode an identity, apply it to a MODEL, build the identity prompt,
save/load identities. Each node only routes tensors into `idadapter_core` / `idadapter_binding`."""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..idadapter_core.idadapter import format_identity_prompt, load_identity_embeds, save_identity_embeds
from ..idadapter_core.errors import IDAdapterError
from ..idadapter_core.schedule import BLOCK_MODES, NEGATIVE_IDENTITY_MODES, AdapterStrength
from .comfy_binding import register_weights_folder
from .idadapter_binding import (
    apply_idadapter, encode_identity, identity_tokens_for_clip, load_idadapter_for_comfy, replace_trigger_tokens,
    trigger_token_id,
)
from .pack_types import (
    CATEGORY, FaceFeaturesType, IDAdapterType, IDEmbedsType, PackNode, identity_in_negative_input,
    strength_and_schedule_inputs,
)

log = logging.getLogger(__name__)

EMBEDS_FOLDER = "idadapter_embeds"
MAX_NAME_BYTES = 200
"""A saved identity's name, in UTF-8 bytes: with '.safetensors' and the temporary name it is written under first,
it stays below the 255 bytes file systems allow."""
KV_MODES = ("scaled by weight", "full strength (paper)")
"""How Apply's weight treats the trained cross-attention K/V differences (schedule.AdapterStrength)."""


def embeds_output_dir() -> str:
    """Saved identities live in output/idadapter_embeds (read at call time: the output folder can be moved)."""
    return os.path.join(folder_paths.get_output_directory(), EMBEDS_FOLDER)


def saved_embeds() -> list[str]:
    folder = embeds_output_dir()
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []


register_weights_folder("idadapter")


class LoadIDAdapter(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDAdapterLoader",
            display_name="Load IDAdapter",
            category=CATEGORY,
            description="Loads IDAdapter weights (.safetensors) from models/idadapter.",
            inputs=[
                io.Combo.Input(
                    "adapter_name", options=folder_paths.get_filename_list("idadapter"),
                    tooltip="IDAdapter weights in models/idadapter; they name the base model they were trained for.",
                ),
            ],
            outputs=[IDAdapterType.Output(display_name="IDADAPTER")],
        )

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("idadapter", adapter_name)
        return io.NodeOutput(load_idadapter_for_comfy(path, adapter_name))


class EncodeIdentity(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDAdapterEncodeIdentity",
            display_name="Encode Identity (MFF)",
            category=CATEGORY,
            description="Mixed Facial Features: turns the face features of the references into the identity's "
                        "reference tokens (for Apply IDAdapter) and identity token (for Identity Prompt).",
            inputs=[
                IDAdapterType.Input("idadapter", tooltip="From Load IDAdapter."),
                FaceFeaturesType.Input("face_features", tooltip="From Extract Face Features: ArcFace + CLIP features of N references."),
            ],
            outputs=[IDEmbedsType.Output(display_name="ID_EMBEDS")],
        )

    @classmethod
    def execute(cls, idadapter, face_features) -> io.NodeOutput:
        if face_features.face_embeds.shape[0] != idadapter.config.num_refs:
            log.info(
                "IDAdapter: encoding %d references; '%s' was trained with N=%d",
                face_features.face_embeds.shape[0], idadapter.name, idadapter.config.num_refs,
            )
        embeds = encode_identity(
            idadapter, face_features.clip_patches[None], face_features.face_embeds[None], face_features.clip_image_embeds[None]
        )
        return io.NodeOutput(embeds)


class ApplyIDAdapter(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDAdapterApply",
            display_name="Apply IDAdapter",
            category=CATEGORY,
            description="Returns a copy of the model whose transformer blocks attend to the identity's reference "
                        "tokens (gated self-attention, IDAdapter eq. 7). The input model is left untouched.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5, SD2.x or SDXL model matching the IDAdapter weights' base."),
                IDAdapterType.Input("idadapter", tooltip="From Load IDAdapter."),
                IDEmbedsType.Input("id_embeds", tooltip="From Encode Identity or Load ID Embeds, made with the same weights."),
                *strength_and_schedule_inputs(
                    (-1.0, 3.0), "β of the paper, the strength of the adapter and of the trained cross-attention K/V "
                                 "(W + weight·ΔW): 0 turns IDAdapter off.", acting="IDAdapter (adapter and K/V)",
                ),
                io.Combo.Input(
                    "cross_attention_kv", options=list(KV_MODES), default=KV_MODES[0], optional=True, advanced=True,
                    tooltip="'scaled by weight': the trained K/V differences follow weight. 'full strength (paper)': "
                            "they stay at 1 between start_at and end_at and weight scales only the adapter (β of the "
                            "paper's eq. 7), so weight 0 still leaves the trained K/V on.",
                ),
                io.Combo.Input(
                    "blocks", options=list(BLOCK_MODES), default=BLOCK_MODES[0], optional=True, advanced=True,
                    tooltip="'all': the adapter in every transformer block (the paper). 'skip highest resolution': not "
                            "in the blocks of the largest feature maps, about half of its cost (README, Speed); not "
                            "part of the paper, so check the likeness.",
                ),
                identity_in_negative_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, idadapter, id_embeds, weight: float, start_at: float, end_at: float, mask=None,
                cross_attention_kv: str = KV_MODES[0], blocks: str = BLOCK_MODES[0],
                identity_in_negative: str = NEGATIVE_IDENTITY_MODES[0]) -> io.NodeOutput:
        strength = AdapterStrength(weight, kv_follows_weight=cross_attention_kv == KV_MODES[0])
        return io.NodeOutput(apply_idadapter(model, idadapter, id_embeds, strength, start_at, end_at, blocks, mask,
                                               identity_in_negative))


class IdentityPrompt(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDAdapterIdentityPrompt",
            display_name="Identity Prompt",
            category=CATEGORY,
            description="Encodes the prompt with ', <class word> is <trigger word>' appended and the trigger word's "
                        "input embedding replaced by the identity token (IDAdapter §3.4). Use a plain CLIP Text "
                        "Encode for the negative prompt.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the checkpoint the weights were trained for."),
                IDAdapterType.Input("idadapter", tooltip="From Load IDAdapter."),
                IDEmbedsType.Input("id_embeds", tooltip="From Encode Identity or Load ID Embeds."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="a photo of a person, outdoors",
                                tooltip="The prompt; the identity clause is appended at its end."),
                io.String.Input("class_word", default="",
                                tooltip="man, woman, person, ... Empty uses the class word stored in the weights."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, idadapter, id_embeds, text: str, class_word: str) -> io.NodeOutput:
        id_embeds.check_made_by(idadapter.fingerprint, idadapter.name)
        config = idadapter.config
        prompt = format_identity_prompt(text, class_word.strip() or config.class_word, config.trigger_word)
        tokens = clip.tokenize(prompt)
        identity_tokens = identity_tokens_for_clip(clip, tokens, idadapter, id_embeds)
        if id_embeds.reference_tokens.shape[0] > 1:
            log.warning("IDAdapter: the prompt carries one identity token; using the first of %d identities",
                        id_embeds.reference_tokens.shape[0])
        trigger_ids = {key: trigger_token_id(clip, key, config.trigger_word) for key in tokens}
        if not replace_trigger_tokens(tokens, trigger_ids, identity_tokens):
            raise IDAdapterError(f"the trigger word '{config.trigger_word}' was not found in the tokenized prompt")
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens))


def safe_embeds_path(name: str) -> str:
    """A file inside output/idadapter_embeds, refusing names that would leave it, that span lines or hold control
    characters, or that are too long for a file name."""
    cleaned = name.strip()
    if cleaned.endswith(".safetensors"):
        cleaned = cleaned[: -len(".safetensors")]
    if (
        not cleaned or cleaned in (".", "..") or any(sep in cleaned for sep in ("/", "\\")) or ".." in cleaned
        or ":" in cleaned or any(ord(c) < 32 or ord(c) == 127 for c in cleaned)
        or len(cleaned.encode("utf-8")) > MAX_NAME_BYTES
    ):
        shown = repr(name if len(name) <= 40 else name[:40] + "...")
        raise IDAdapterError(
            f"{shown} is not a plain file name; use letters, digits, '-', '_' on one line, at most {MAX_NAME_BYTES} "
            "characters (no folders, '..' or drive letters)."
        )
    folder = embeds_output_dir()
    path = os.path.abspath(os.path.join(folder, f"{cleaned}.safetensors"))
    if os.path.commonpath([path, os.path.abspath(folder)]) != os.path.abspath(folder):
        raise IDAdapterError(f"'{name}' would be saved outside {folder}")
    return path


class SaveIDEmbeds(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDAdapterSaveIDEmbeds",
            display_name="Save ID Embeds",
            category=CATEGORY,
            description="Saves an encoded identity to output/idadapter_embeds, to reuse without the face models.",
            inputs=[
                IDEmbedsType.Input("id_embeds", tooltip="From Encode Identity."),
                io.String.Input("name", default="identity", tooltip="File name (no folders); an existing file of that name is replaced."),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, id_embeds, name: str) -> io.NodeOutput:
        path = safe_embeds_path(name)
        save_identity_embeds(path, id_embeds)
        log.info("IDAdapter: saved ID embeds to %s", path)
        saved = os.path.basename(path)
        shown = f"saved {saved} in {EMBEDS_FOLDER}/ (Load ID Embeds lists it after a refresh)"
        return io.NodeOutput(path, ui=ui.PreviewText(shown))


class LoadIDEmbeds(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDAdapterLoadIDEmbeds",
            display_name="Load ID Embeds",
            category=CATEGORY,
            description="Loads an identity saved with Save ID Embeds.",
            inputs=[
                io.Combo.Input("embeds_name", options=saved_embeds(), tooltip="A file in output/idadapter_embeds."),
            ],
            outputs=[IDEmbedsType.Output(display_name="ID_EMBEDS")],
        )

    @classmethod
    def execute(cls, embeds_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_identity_embeds(safe_embeds_path(embeds_name)))


IDADAPTER_NODES = [LoadIDAdapter, EncodeIdentity, ApplyIDAdapter, IdentityPrompt, SaveIDEmbeds, LoadIDEmbeds]
