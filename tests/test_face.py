"""Face feature extraction through insightface's real loading and routing code, with tiny exported ONNX models
(train/tiny_face_models.py): a detector that finds red squares of known sizes and a random-weight recognizer."""
from __future__ import annotations

import logging
import shutil
import warnings

import numpy as np
import pytest
import torch

from train.tiny_face_models import ARCFACE_TEMPLATE, export_detector, square_faces_image, write_model_pack
from idadapter_core import IDAdapter, MFFConfig
from idadapter_core.errors import IDAdapterError
from idadapter_core.face import (
    Augmentation, DetectedFace, FaceFeatures, FaceModelMissingError, NoFaceError, align_reference, arcface_matrix,
    detect_face, extract_face_features, find_reference_faces, load_face_analyzer,
    load_image, to_rgb_uint8,
)
from idadapter_core.hosts import clip_encoder_from_transformers
from idadapter_core.presets import UNetLayout

# A 320x320 image (detection size 320: no resizing) with three faces, left to right: 32 px, 128 px, 64 px,
# spaced so no face sits in another's surround window.
THREE_FACES = [(64, 48, 32), (96, 224, 128), (256, 64, 64)]
ONE_FACE = [(160, 160, 128)]


pytestmark = pytest.mark.usefixtures("no_downloads")


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    write_model_pack(root, "tiny_pack", embed_dim=64)
    write_model_pack(root, "tiny_pack_96", embed_dim=96)
    return root


@pytest.fixture(scope="module")
def analyzer(pack_root):
    return load_face_analyzer(pack_root, "tiny_pack", "CPU", det_size=320)


@pytest.fixture(scope="module")
def clip_model():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=32, projection_dim=16)
    return CLIPVisionModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def encode_clip(clip_model):
    return clip_encoder_from_transformers(clip_model)


def faces_image(faces=ONE_FACE, seed=0, size=(320, 320)):
    return square_faces_image(size, faces, seed=seed)


def test_pack_is_loaded_and_routed_by_insightface(analyzer):
    from insightface.app import FaceAnalysis
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    assert isinstance(analyzer.app, FaceAnalysis)
    assert isinstance(analyzer.detector, SCRFD) and analyzer.detector.use_kps
    assert isinstance(analyzer.recognizer, ArcFaceONNX)
    assert (analyzer.name, analyzer.provider, analyzer.arcface_size) == ("tiny_pack", "CPU", 112)


@pytest.mark.parametrize("name,width", [("tiny_pack", 64), ("tiny_pack_96", 96)])
def test_embedding_width_comes_from_the_recognizer(pack_root, encode_clip, name, width):
    analyzer = load_face_analyzer(pack_root, name, det_size=320)
    assert analyzer.embed_dim == width
    features, _ = extract_face_features(analyzer, [faces_image()], encode_clip, num_refs=2)
    assert features.face_embeds.shape == (2, width) and features.face_embed_dim == width


def test_detector_finds_the_squares_where_they_are(analyzer):
    boxes, landmarks = analyzer.detect(faces_image(THREE_FACES), 320)
    found = sorted(tuple(b[:4].round().astype(int)) for b in boxes)
    assert found == [(32, 160, 160, 288), (48, 32, 80, 64), (224, 32, 288, 96)]
    assert landmarks.shape == (3, 5, 2)


def test_largest_face_by_default_and_index_left_to_right(analyzer, caplog):
    image = faces_image(THREE_FACES)
    largest = detect_face(analyzer, image, 0)
    assert largest.box.round().tolist() == [32, 160, 160, 288] and largest.faces_in_image == 3
    by_index = [detect_face(analyzer, image, 0, face_index=i, min_face_size=0).box[0] for i in range(3)]
    assert by_index == [48, 32, 224]  # centres x = 64, 96, 256
    assert "the image holds only 3 face(s)" in detect_face(analyzer, image, 0, face_index=3)
    with caplog.at_level(logging.INFO):
        find_reference_faces(analyzer, [image])
    assert "image 1/1 has 3 faces; using the largest" in caplog.text


def test_too_small_face_is_skipped_with_a_warning(analyzer, caplog):
    small = faces_image([(64, 48, 32)])
    with caplog.at_level(logging.WARNING):
        faces, _, skipped = find_reference_faces(analyzer, [small, faces_image()], min_face_size=48)
    assert [f.source_index for f in faces] == [1]
    assert skipped[0].startswith("face too small (32 px, minimum 48 px)")
    assert "skipping reference image 1/2: face too small" in caplog.text


def test_image_without_face_is_skipped_and_named(analyzer, caplog):
    blank = np.full((320, 320, 3), 128, np.uint8)
    with caplog.at_level(logging.WARNING):
        faces, _, skipped = find_reference_faces(analyzer, [blank, faces_image(), blank])
    assert [f.source_index for f in faces] == [1]
    assert set(skipped) == {0, 2}
    assert skipped[0] == "no face found (detection sizes 320, 256, 160 tried)"
    assert "skipping reference image 3/3: no face found" in caplog.text


def test_error_only_when_no_reference_is_usable(analyzer):
    blank = np.full((320, 320, 3), 128, np.uint8)
    with pytest.raises(NoFaceError) as caught:
        find_reference_faces(analyzer, [blank, faces_image([(64, 48, 32)])], image_names=["a.jpg", "b.jpg"])
    message = str(caught.value)
    assert "a.jpg: no face found" in message and "b.jpg: face too small" in message
    assert "detection size" in message and "crop the images closer" in message


def test_smaller_detection_sizes_are_tried(pack_root):
    """A 128 px face in a 256 px image is only found once the image is not scaled up (det size 256)."""
    analyzer = load_face_analyzer(pack_root, "tiny_pack", det_size=640)
    image = square_faces_image((256, 256), [(128, 128, 128)])
    for size in (640, 512, 384):
        assert len(analyzer.detect(image, size)[0]) == 0
    face = detect_face(analyzer, image, 0)
    assert face.det_size == 256 and face.box.round().tolist() == [64, 64, 192, 192]


def random_similarity(rng):
    angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(1.5, 3.0)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return rotation, rng.uniform(50, 150, size=2)


def test_alignment_is_insightface_norm_crop_exactly():
    from insightface.utils import face_align

    rng = np.random.default_rng(0)
    rotation, shift = random_similarity(rng)
    landmarks = (ARCFACE_TEMPLATE @ rotation.T + shift).astype(np.float32)
    # the similarity found maps the landmarks onto insightface's template (exactly, they are one)
    matrix = arcface_matrix(landmarks)
    mapped = np.hstack([landmarks, np.ones((5, 1))]) @ matrix[:2].T
    np.testing.assert_allclose(mapped, face_align.arcface_dst, atol=1e-3)
    # and the crop is the one insightface's norm_crop makes, pixel for pixel
    image = rng.integers(0, 256, size=(400, 500, 3), dtype=np.uint8)
    aligned = align_reference(image, DetectedFace(0, np.zeros(4, np.float32), landmarks, 1.0, 1, 320))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-image >= 0.26 inside insightface
        expected = face_align.norm_crop(image, landmarks, 112)
    np.testing.assert_array_equal(aligned.arcface_crop, expected)
    # the CLIP crop shows 1.5x the ArcFace crop about the same centre, at 224 px
    zoom = 224 / (112 * 1.5)
    np.testing.assert_allclose(aligned.clip_landmarks, (face_align.arcface_dst - 55.5) * zoom + 111.5, atol=1e-2)
    assert aligned.clip_crop.shape == (224, 224, 3)


def test_flip_augmentation_mirrors_both_crops(analyzer):
    image = faces_image(seed=3)
    face = detect_face(analyzer, image, 0)
    plain = align_reference(image, face)
    flipped = align_reference(image, face, augmentation=Augmentation(True, 0.0, 1.0, 1.0, 1.0))
    assert np.abs(flipped.arcface_crop.astype(int) - plain.arcface_crop[:, ::-1]).mean() < 0.5
    assert np.abs(flipped.clip_crop.astype(int) - plain.clip_crop[:, ::-1]).mean() < 0.5


def test_arcface_embeddings_are_unit_length_and_repeatable(analyzer, encode_clip):
    images = [faces_image(seed=1), faces_image(seed=2)]
    first, _ = extract_face_features(analyzer, images, encode_clip, num_refs=4)
    second, _ = extract_face_features(analyzer, images, encode_clip, num_refs=4)
    assert torch.equal(first.face_embeds, second.face_embeds)
    assert torch.equal(first.clip_patches, second.clip_patches)
    torch.testing.assert_close(first.face_embeds.norm(dim=-1), torch.ones(4))
    # the two images are different "people" to the random recognizer
    assert float(first.face_embeds[0] @ first.face_embeds[1]) < 0.99


@pytest.mark.parametrize("given,num_refs", [(1, 1), (1, 4), (2, 4), (3, 3), (2, 5)])
@pytest.mark.parametrize("fill_mode", ["replicate", "augment"])
def test_fill_modes_produce_n_references(analyzer, encode_clip, given, num_refs, fill_mode):
    images = [faces_image(seed=i) for i in range(given)]
    features, references = extract_face_features(analyzer, images, encode_clip, num_refs=num_refs, fill_mode=fill_mode)
    assert len(references) == num_refs
    assert features.face_embeds.shape == (num_refs, 64)
    assert features.clip_patches.shape == (num_refs, 49, 32)  # (224 / 32)^2 patches, CLS dropped
    assert features.clip_image_embeds.shape == (num_refs, 16)
    assert features.boxes.shape == (given, 4) and features.landmarks.shape == (given, 5, 2)
    assert features.source_indices == list(range(given))
    assert features.reference_sources == [i % given for i in range(num_refs)]
    filled = features.face_embeds[given:]
    originals = features.face_embeds[[i % given for i in range(given, num_refs)]]
    if fill_mode == "replicate":
        assert torch.equal(filled, originals) and features.augmentations == [""] * num_refs
    else:
        assert all(features.augmentations[given:]) and not any(features.augmentations[:given])
        assert not torch.isclose(filled, originals).all(dim=-1).any()


def test_replicated_references_are_encoded_once(analyzer, encode_clip):
    batches = []

    def counting_encoder(crops):
        batches.append(crops.shape[0])
        return encode_clip(crops)

    replicated, _ = extract_face_features(analyzer, [faces_image()], counting_encoder, num_refs=4)
    augmented, _ = extract_face_features(analyzer, [faces_image()], counting_encoder, num_refs=4, fill_mode="augment")
    assert batches == [1, 4]
    assert all(torch.equal(replicated.clip_patches[i], replicated.clip_patches[0]) for i in range(4))
    assert torch.equal(replicated.clip_patches[0], augmented.clip_patches[0])


def test_augmentation_follows_the_seed(analyzer, encode_clip):
    image = [faces_image()]
    run = lambda seed: extract_face_features(analyzer, image, encode_clip, num_refs=3, fill_mode="augment", seed=seed)[0]
    assert torch.equal(run(7).face_embeds, run(7).face_embeds)
    assert run(7).augmentations != run(8).augmentations


def test_more_usable_images_than_n_uses_the_first_n(analyzer, encode_clip, caplog):
    images = [np.full((320, 320, 3), 128, np.uint8)] + [faces_image(seed=i) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        features, _ = extract_face_features(analyzer, images, encode_clip, num_refs=2)
    assert features.source_indices == [1, 2] and features.skipped.keys() == {0}
    assert "3 usable references, using the first 2" in caplog.text


def test_invalid_fill_mode_and_n(analyzer, encode_clip):
    with pytest.raises(IDAdapterError, match="fill mode 'mirror'"):
        extract_face_features(analyzer, [faces_image()], encode_clip, fill_mode="mirror")
    with pytest.raises(IDAdapterError, match="at least 1"):
        extract_face_features(analyzer, [faces_image()], encode_clip, num_refs=0)


def test_image_conversions():
    gray = np.array([[0, 128], [255, 64]], np.uint8)
    assert to_rgb_uint8(gray).tolist() == [[[v] * 3 for v in row] for row in gray.tolist()]
    assert np.array_equal(to_rgb_uint8(gray[..., None]), to_rgb_uint8(gray))
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], np.uint8)
    assert to_rgb_uint8(rgba).tolist() == [[[255, 0, 0], [255, 255, 255], [127, 127, 127]]]
    assert to_rgb_uint8(np.array([[[10, 20, 30, 0]]], np.uint8)).tolist() == [[[10, 20, 30]]]  # broken all-zero alpha
    assert to_rgb_uint8(np.array([[[0, 32896, 65535]]], np.uint16)).tolist() == [[[0, 128, 255]]]
    assert to_rgb_uint8(torch.tensor([[[0.0, 0.5, 1.2]]])).tolist() == [[[0, 128, 255]]]
    assert to_rgb_uint8(np.array([[[100, 255]]], np.uint8)).tolist() == [[[100, 100, 100]]]  # gray + alpha


def test_load_image_keeps_16_bit_and_expands_palettes(tmp_path):
    from PIL import Image

    deep = np.array([[0, 1000, 65535]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").dtype == np.uint16
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png"), deep)
    palette = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)).convert("P")
    palette.save(tmp_path / "palette.png")
    assert to_rgb_uint8(load_image(tmp_path / "palette.png")).tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_converted_inputs_give_the_same_face(analyzer):
    image = faces_image()
    reference = detect_face(analyzer, image, 0)
    rgba = np.concatenate([image, np.full((320, 320, 1), 255, np.uint8)], axis=2)
    sixteen = image.astype(np.uint16) * 257
    as_float = torch.from_numpy(image).float() / 255.0
    faces, _, _ = find_reference_faces(analyzer, [rgba, sixteen, as_float])
    for face in faces:
        np.testing.assert_array_equal(face.box, reference.box)


def test_unreadable_image_is_skipped(analyzer):
    faces, _, skipped = find_reference_faces(analyzer, [np.zeros((4, 4, 5), np.uint8), faces_image()])
    assert [f.source_index for f in faces] == [1] and "got shape (4, 4, 5)" in skipped[0]


def test_features_feed_encode_identity(analyzer, encode_clip):
    """The tensors have exactly the shapes IDAdapter.encode takes (what the Encode Identity node calls)."""
    from conftest import tiny_config

    layout = UNetLayout("tiny", (16, 32), (2, 2), 24, {"l": 24})
    mff = MFFConfig(clip_dim=32, face_dim=64, num_patches=49, width=20, depth=1, heads=4)
    adapter = IDAdapter(tiny_config(layout, mff=mff, clip_embed_dim=16, num_refs=3))
    features, _ = extract_face_features(analyzer, [faces_image()], encode_clip, num_refs=3)
    assert isinstance(features, FaceFeatures)
    embeds = adapter.encode(features.clip_patches[None], features.face_embeds[None], features.clip_image_embeds[None])
    assert embeds.reference_tokens.shape == (1, 3 * 49 + 1, 20)


def test_clip_encoder_takes_the_penultimate_layer(clip_model, encode_clip):
    crops = torch.randint(0, 256, (2, 224, 224, 3)).float() / 255.0  # pixels of 8-bit images, as crops are
    hidden, image_embeds = encode_clip(crops)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = clip_model(pixel_values=(crops.movedim(-1, 1) - mean) / std, output_hidden_states=True)
    torch.testing.assert_close(hidden, out.hidden_states[-2])
    torch.testing.assert_close(image_embeds, out.image_embeds)
    assert not torch.allclose(hidden, out.hidden_states[-1])


def test_bad_clip_encoder_output_is_explained(analyzer):
    with pytest.raises(IDAdapterError, match="expected \\(N, 1 \\+ patches, width\\)"):
        extract_face_features(analyzer, [faces_image()], lambda crops: (torch.zeros(1, 8), torch.zeros(1, 4)), num_refs=2)


# --- model folders ------------------------------------------------------------------------------------


def test_missing_folder_names_the_path_and_files(tmp_path):
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    with pytest.raises(FaceModelMissingError) as caught:
        load_face_analyzer(tmp_path, "antelopev2")
    message = str(caught.value)
    assert str(tmp_path / "models" / "antelopev2") in message
    assert "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message
    assert "Model packs found: buffalo_l" in message and "never downloads" in message


def test_folder_nested_one_level_too_deep_loads_with_a_warning(tmp_path, pack_root, caplog):
    shutil.copytree(pack_root / "models" / "tiny_pack", tmp_path / "models" / "antelopev2" / "antelopev2")
    with caplog.at_level(logging.WARNING):
        analyzer = load_face_analyzer(tmp_path, "antelopev2", det_size=320)
    assert analyzer.model_dir == tmp_path / "models" / "antelopev2" / "antelopev2"
    assert "nested one level too deep" in caplog.text and "move them up one folder" in caplog.text
    assert len(analyzer.detect(faces_image(), 320)[0]) == 1


def test_folder_without_models_level_loads_with_a_warning(tmp_path, pack_root, caplog):
    shutil.copytree(pack_root / "models" / "tiny_pack", tmp_path / "buffalo_l")
    with caplog.at_level(logging.WARNING):
        analyzer = load_face_analyzer(tmp_path, "buffalo_l")
    assert analyzer.model_dir == tmp_path / "buffalo_l"
    assert f"insightface looks in {tmp_path / 'models' / 'buffalo_l'}" in caplog.text


def test_later_roots_are_searched(tmp_path, pack_root):
    (tmp_path / "models" / "tiny_pack").mkdir(parents=True)  # an empty leftover in the first root
    analyzer = load_face_analyzer([tmp_path, pack_root], "tiny_pack")
    assert analyzer.model_dir == pack_root / "models" / "tiny_pack"


@pytest.mark.parametrize("contents,expected", [
    ((), "has no .onnx files"),
    (("detector",), "no face recognizer among ['det_tiny.onnx']"),
    (("recognizer",), "no face detector among ['rec_tiny.onnx']"),
    (("corrupt",), "could not load the insightface models"),
])
def test_incomplete_folder_is_explained(tmp_path, contents, expected):
    folder = write_model_pack(tmp_path, "antelopev2", detector="detector" in contents,
                              recognizer="recognizer" in contents)
    if "corrupt" in contents:
        (folder / "scrfd_10g_bnkps.onnx").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(FaceModelMissingError) as caught:
        load_face_analyzer(tmp_path, "antelopev2")
    assert expected in str(caught.value)
    if "corrupt" not in contents:
        assert "scrfd_10g_bnkps.onnx" in str(caught.value) and "glintr100.onnx" in str(caught.value)


def test_detector_without_keypoints_is_refused(tmp_path, pack_root):
    """A 6-output SCRFD (no keypoints) cannot align faces."""
    import onnx

    folder = tmp_path / "models" / "nokps"
    shutil.copytree(pack_root / "models" / "tiny_pack", folder)
    model = onnx.load(str(export_detector(tmp_path / "det.onnx")))
    keep = model.graph.output[:6]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(folder / "det_tiny.onnx"))
    with pytest.raises(FaceModelMissingError, match="no facial landmarks"):
        load_face_analyzer(tmp_path, "nokps")


def test_provider_not_installed_falls_back_to_cpu(pack_root, caplog):
    import onnxruntime

    from idadapter_core.face import PROVIDERS

    missing = next((s for s, n in PROVIDERS.items() if n not in onnxruntime.get_available_providers()), None)
    if missing is None:
        pytest.skip("every known onnxruntime provider is installed here")
    with caplog.at_level(logging.WARNING):
        analyzer = load_face_analyzer(pack_root, "tiny_pack", provider=missing)
    assert analyzer.provider == "CPU"
    assert f"provider '{missing}' is not installed" in caplog.text


def test_detection_size_must_suit_scrfd(pack_root):
    with pytest.raises(IDAdapterError, match="multiple of 32"):
        load_face_analyzer(pack_root, "tiny_pack", det_size=300)


def test_another_packs_insightface_model_is_accepted_and_anything_else_refused(analyzer):
    """ComfyUI's FACE_ANALYSIS socket is shared: an insightface FaceAnalysis prepared by another pack works like
    ours, and what is not one is refused with a message instead of an AttributeError."""
    from types import SimpleNamespace

    from idadapter_core.face import as_face_analyzer

    assert as_face_analyzer(analyzer) is analyzer
    wrapped = as_face_analyzer(analyzer.app)
    assert wrapped.name == analyzer.model_dir.name and wrapped.embed_dim == analyzer.embed_dim == 64
    image = square_faces_image((320, 320), ONE_FACE)
    ours, theirs = (detect_face(a, image, 0) for a in (analyzer, wrapped))
    np.testing.assert_array_equal(ours.landmarks, theirs.landmarks)
    crop = align_reference(image, ours).arcface_crop
    np.testing.assert_array_equal(analyzer.embed(crop), wrapped.embed(crop))
    with pytest.raises(IDAdapterError, match="not an insightface model"):
        as_face_analyzer(object())
    with pytest.raises(IDAdapterError, match="no recognition model"):
        as_face_analyzer(SimpleNamespace(models={"detection": analyzer.detector}))


def test_extreme_aspect_ratio_is_a_skip_reason_not_a_crash(analyzer):
    reason = detect_face(analyzer, np.full((3, 4000, 3), 128, np.uint8), 0)
    assert isinstance(reason, str) and "4000x3 px" in reason


def test_references_of_one_person_are_grouped_and_others_named():
    from idadapter_core.face import check_one_person

    g = np.random.default_rng(0)
    alice = g.normal(size=16)
    people = [alice + 0.3 * g.normal(size=16) for _ in range(3)] + [g.normal(size=16)]
    embeddings = np.stack([p / np.linalg.norm(p) for p in people])
    check = check_one_person(embeddings, ["a", "b", "c", "d"], threshold=0.5)
    assert check.person == [0, 1, 2] and list(check.others) == [3]
    assert check.others[3] == pytest.approx(float((embeddings[:3] @ embeddings[3]).mean()))
    assert "do not look like one person: d (similarity" in check.warning() and "against a, b, c" in check.warning()
    assert check_one_person(embeddings[:3], ["a", "b", "c"], threshold=0.5).warning() is None
    assert check_one_person(embeddings, list("abcd"), threshold=-1.0).warning() is None


def test_the_no_face_message_gives_the_tips_for_the_reasons_found(analyzer):
    with pytest.raises(NoFaceError) as caught:
        find_reference_faces(analyzer, [faces_image()], face_index=5)
    message = str(caught.value)
    assert "set face to 'largest'" in message and "detection size" not in message
