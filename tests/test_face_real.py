"""The production code path on real photos: the stand-in insightface pack in ../shared/assets (a real SCRFD-2.5G
detector and a real 128-d MobileFaceNet recognizer) and the photos there and in insightface's own data folder.
Skipped when ../shared is absent."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from conftest import shared_assets_or_skip
from idadapter_core.face import (
    detect_face, extract_face_features, find_reference_faces, load_face_analyzer, load_image, to_rgb_uint8,
)

STANDIN = "standin_scrfd_mbf128"
OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg")


@pytest.fixture(scope="module")
def assets():
    return shared_assets_or_skip()


@pytest.fixture(scope="module")
def analyzer(assets):
    return load_face_analyzer(assets / "insightface", STANDIN, "CPU", det_size=640)


@pytest.fixture(scope="module")
def photos(assets):
    names = [*OBAMA, "biden.jpg", "32bit.png", "obama_partial_face.jpg"]
    return {name: load_image(assets / "faces" / name) for name in names}


def insightface_image(name: str) -> np.ndarray:
    import insightface

    return load_image(os.path.join(os.path.dirname(insightface.__file__), "data", "images", name))


def patch_encoder(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for CLIP (none is available offline): 8x8-pixel patch means as tokens, plus a CLS token."""
    patches = torch.nn.functional.avg_pool2d(crops.movedim(-1, 1), 8).flatten(2).transpose(1, 2)  # (N, 784, 3)
    hidden = torch.cat([patches.mean(1, keepdim=True), patches], dim=1)
    return hidden, patches.mean(1)


def embedding(analyzer, image) -> torch.Tensor:
    features, _ = extract_face_features(analyzer, [image], patch_encoder, num_refs=1)
    return features.face_embeds[0]


def test_one_face_per_photo(analyzer, photos):
    faces, _, skipped = find_reference_faces(analyzer, list(photos.values()), image_names=list(photos))
    assert not skipped
    assert [f.faces_in_image for f in faces] == [1] * len(photos)
    assert all(f.size > 200 and f.score > 0.7 for f in faces)


def test_same_person_is_more_similar_than_another(analyzer, photos):
    """Measured: Obama-Obama 0.71-0.76, Obama-Biden -0.03-0.10 (the 128-d stand-in recognizer)."""
    features, _ = extract_face_features(analyzer, [photos[n] for n in (*OBAMA, "biden.jpg")], patch_encoder, num_refs=4)
    assert features.face_model == STANDIN and features.face_embed_dim == 128  # taken from the recognizer
    cos = features.face_embeds @ features.face_embeds.T
    same = [float(cos[i, j]) for i, j in itertools.combinations(range(3), 2)]
    other = [float(cos[i, 3]) for i in range(3)]
    assert min(same) > 0.6 and max(other) < 0.25
    assert min(same) - max(other) > 0.5


def test_rgba_photo_matches_its_rgb_version(analyzer, photos):
    rgba = photos["32bit.png"]
    assert rgba.shape[2] == 4
    assert float(embedding(analyzer, rgba) @ embedding(analyzer, photos["obama2.jpg"])) > 0.99


def test_partial_face_is_handled(analyzer, photos):
    """The face is cut off at the left edge: the box leaves the image, the crops get a black border, and the
    embedding still points at the same person."""
    face = detect_face(analyzer, to_rgb_uint8(photos["obama_partial_face.jpg"]), 0)
    assert face.box[0] < 0
    features, references = extract_face_features(analyzer, [photos["obama_partial_face.jpg"]], patch_encoder, num_refs=1)
    assert (references[0].clip_crop[:, :10] == 0).all()
    assert float(features.face_embeds[0] @ embedding(analyzer, photos["obama.jpg"])) > 0.6


def test_grayscale_and_16_bit_inputs(analyzer, photos):
    rgb = photos["obama.jpg"]
    reference = embedding(analyzer, rgb)
    sixteen = rgb.astype(np.uint16) * 257
    assert torch.equal(embedding(analyzer, sixteen), reference)
    gray = np.round(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    assert float(embedding(analyzer, gray) @ reference) > 0.8


def test_group_photo_largest_face_and_left_to_right(analyzer):
    """insightface's own t1.jpg: six people."""
    image = to_rgb_uint8(insightface_image("t1.jpg"))
    largest = detect_face(analyzer, image, 0)
    assert largest.faces_in_image == 6
    faces = [detect_face(analyzer, image, 0, face_index=i) for i in range(6)]
    centres = [float(f.box[0] + f.box[2]) / 2 for f in faces]
    assert centres == sorted(centres)
    areas = [float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])) for f in faces]
    assert float((largest.box[2] - largest.box[0]) * (largest.box[3] - largest.box[1])) == max(areas)


def test_group_photo_gives_one_person_by_position_and_names_a_missing_one(analyzer):
    """Extract Face Features' `face = left to right` on t1.jpg: face_index 1 is the second person from the left;
    face_index 6 is one more than the photo holds."""
    from idadapter_core.face import NoFaceError, chosen_face_index

    image = to_rgb_uint8(insightface_image("t1.jpg"))
    second = detect_face(analyzer, image, 0, face_index=1)
    features, _ = extract_face_features(analyzer, [image], patch_encoder, num_refs=1,
                                        face_index=chosen_face_index("left to right", 1), image_names=["t1.jpg"])
    assert torch.equal(features.boxes[0], torch.from_numpy(second.box))
    largest, _ = extract_face_features(analyzer, [image], patch_encoder, num_refs=1,
                                       face_index=chosen_face_index("largest", 1))
    assert not torch.equal(largest.boxes[0], features.boxes[0])
    with pytest.raises(NoFaceError, match=r"t1.jpg: face_index 6 asked for .* holds only 6 face\(s\)"):
        extract_face_features(analyzer, [image], patch_encoder, num_refs=1,
                              face_index=chosen_face_index("left to right", 6), image_names=["t1.jpg"])


def test_close_crop_found_at_a_smaller_detection_size(analyzer):
    """insightface's Tom_Hanks_54745.png is already a 112x112 aligned face: the 640 detector misses it, the
    fallback sizes find it."""
    image = to_rgb_uint8(insightface_image("Tom_Hanks_54745.png"))
    assert len(analyzer.detect(image, 640)[0]) == 0
    face = detect_face(analyzer, image, 0)
    assert not isinstance(face, str) and face.det_size < 640
