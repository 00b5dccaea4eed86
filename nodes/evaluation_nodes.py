"""Face Similarity: how much a generated image looks like the reference person (ArcFace cosine)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..idadapter_core.face import as_face_analyzer, identity_similarity
from .pack_types import CATEGORY, PackNode

log = logging.getLogger(__name__)


class FaceSimilarity(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDAdapterFaceSimilarity",
            display_name="Face Similarity",
            category=CATEGORY,
            description="ArcFace cosine similarity of each generated image's largest face to the reference face(s), "
                        "the ID-Sim metric of the IDAdapter paper.",
            inputs=[
                io.FaceAnalysis.Input("face_analysis", tooltip="From Load InsightFace."),
                io.Image.Input("reference", tooltip="Photo(s) of the person; their embeddings are averaged."),
                io.Image.Input("generated", tooltip="Generated image(s) to score."),
            ],
            outputs=[
                io.Float.Output(display_name="similarity", is_output_list=True,
                                tooltip="One score per generated image; 0.0 where no face was found (see the text)."),
                io.String.Output(display_name="summary"),
            ],
        )

    @classmethod
    def execute(cls, face_analysis, reference, generated) -> io.NodeOutput:
        report = identity_similarity(as_face_analyzer(face_analysis), reference, generated)
        summary = report.summary()
        log.info("%s", summary)
        return io.NodeOutput([0.0 if s is None else s for s in report.scores], summary)
