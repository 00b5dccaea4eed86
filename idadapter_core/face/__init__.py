"""Face analysis of reference images, shared by both methods and the trainer (docs/DESIGN.md §2.2).

Per reference image: detect with the model pack's SCRFD detector (trying smaller detection sizes when nothing is
found), keep one face (the largest by default), align it with insightface's `norm_crop` template for ArcFace
(112x112) and with a wider square crop on the same landmarks for CLIP (224x224), then ArcFace and CLIP features.
The ArcFace width is read from the recognizer (512 for antelopev2/buffalo_l, 128 for the test stand-in), never
assumed. Fewer than N usable images are filled up to N by replication (the paper's inference, IDAdapter §4.1)
or by flip / rotation / colour augmentation (its training augmentation, §3.3). Runs without ComfyUI: the CLIP
vision model is a callable (`ClipEncoder`) the host supplies.

    models.py      model pack folders, providers, loading (FaceAnalyzer)
    images.py      anything image-like -> RGB uint8
    detection.py   one face per image, and why an image is skipped
    alignment.py   ArcFace and CLIP crops, augmentation, filling up to N
    features.py    ArcFace embeddings + CLIP features of N references (FaceFeatures)
    consistency.py whether the references look like one person
    similarity.py  the paper's ID-Sim between references and generated images
"""
from ..errors import FaceModelMissingError, ImageFormatError, NoFaceError
from .alignment import (
    CLIP_CROP_SCALE, CLIP_CROP_SIZE, FILL_MODES, AlignedReference, Augmentation, align_reference, align_references,
    arcface_crop, arcface_matrix, warp, wide_crop_matrix,
)
from .consistency import DEFAULT_SAME_PERSON_THRESHOLD, IdentityCheck, check_one_person
from .detection import (
    FACE_CHOICES, DetectedFace, ProgressFn, SkipReason, chosen_face_index, detect_face, find_reference_faces,
)
from .features import ClipEncoder, FaceFeatures, arcface_embeddings, clip_features, extract_face_features
from .images import as_image_list, load_image, to_rgb_uint8
from .models import (
    FACE_MODEL_NAMES, FALLBACK_DET_SIZES, KNOWN_MODEL_FILES, PROVIDERS, FaceAnalyzer, as_face_analyzer,
    available_providers, execution_providers, find_model_dir, load_face_analyzer,
)
from .similarity import SimilarityReport, face_embeddings, identity_similarity

__all__ = [
    "FaceModelMissingError", "ImageFormatError", "NoFaceError",
    "CLIP_CROP_SCALE", "CLIP_CROP_SIZE", "FILL_MODES", "AlignedReference", "Augmentation", "align_reference",
    "align_references", "arcface_crop", "arcface_matrix", "warp", "wide_crop_matrix",
    "DEFAULT_SAME_PERSON_THRESHOLD", "IdentityCheck", "check_one_person",
    "FACE_CHOICES", "DetectedFace", "ProgressFn", "SkipReason", "chosen_face_index", "detect_face",
    "find_reference_faces",
    "ClipEncoder", "FaceFeatures", "arcface_embeddings", "clip_features", "extract_face_features",
    "as_image_list", "load_image", "to_rgb_uint8",
    "FACE_MODEL_NAMES", "FALLBACK_DET_SIZES", "KNOWN_MODEL_FILES", "PROVIDERS", "FaceAnalyzer", "as_face_analyzer",
    "available_providers", "execution_providers", "find_model_dir", "load_face_analyzer",
    "SimilarityReport", "face_embeddings", "identity_similarity",
]
