"""Face Similarity's core on the real stand-in face models and real photos (skipped without ../shared)."""
import numpy as np
import pytest

from conftest import shared_assets_or_skip


@pytest.fixture(scope="module")
def analyzer():
    from idadapter_core.face import load_face_analyzer

    assets = shared_assets_or_skip()
    return load_face_analyzer(assets / "insightface", "standin_scrfd_mbf128", det_size=640)


def photo(name):
    from idadapter_core.face import load_image

    return load_image(shared_assets_or_skip() / "faces" / name)


def test_same_person_scores_higher_than_another_person(analyzer):
    from idadapter_core.face import identity_similarity

    report = identity_similarity(analyzer, [photo("obama.jpg")], [photo("obama2.jpg"), photo("biden.jpg"), photo("obama3.jpg")])
    same, other, same2 = report.scores
    print(report.summary())
    assert same > 0.5 and same2 > 0.5 and other < 0.3
    assert "image 2: " in report.summary() and "mean over 3" in report.summary()


def test_image_without_a_face_scores_none(analyzer):
    from idadapter_core.face import identity_similarity

    blank = np.full((256, 256, 3), 127, np.uint8)
    report = identity_similarity(analyzer, [photo("obama.jpg"), photo("obama3.jpg")], [blank, photo("obama2.jpg")])
    assert report.scores[0] is None and report.scores[1] > 0.5 and report.reference_faces == 2
    assert "image 1: no face found" in report.summary()


def test_references_without_any_face_are_an_error(analyzer):
    from idadapter_core.face import NoFaceError
    from idadapter_core.face import identity_similarity

    blank = np.zeros((128, 128, 3), np.uint8)
    with pytest.raises(NoFaceError, match="no face found in any reference image"):
        identity_similarity(analyzer, [blank], [photo("obama.jpg")])
