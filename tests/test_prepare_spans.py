"""`ftalk prepare`'s pure parts: span arithmetic, the face verdicts, the clip windows, the crop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fantasytalk_cli.prepare.crop import crop_for, smooth
from fantasytalk_cli.prepare.spans import (
    FaceRules,
    Span,
    WindowRules,
    clip_windows,
    covered,
    frame_verdict,
    interpolate_boxes,
    intersect,
    shot_spans,
    verdict_spans,
)


@dataclass(frozen=True)
class F:
    box: tuple[float, float, float, float]
    score: float = 0.9


def test_intersect_covered_and_shots() -> None:
    a = [Span(0, 4), Span(6, 10)]
    b = [Span(2, 7), Span(9, 12)]
    assert intersect(a, b) == [Span(2, 4), Span(6, 7), Span(9, 10)]
    assert covered(a, Span(3, 7)) == pytest.approx(2.0)
    assert shot_spans([0, 50, 120], 200, 25.0) == [Span(0, 2), Span(2, 4.8), Span(4.8, 8)]


RULES = FaceRules(min_face_fraction=0.15)


@pytest.mark.parametrize(
    ("faces", "previous", "verdict"),
    [
        ([F((100, 100, 200, 220))], None, "ok"),
        ([], None, "no-face"),
        ([F((100, 100, 200, 220), score=0.2)], None, "no-face"),
        ([F((100, 100, 200, 220)), F((300, 100, 390, 210))], None, "two-faces"),
        ([F((100, 100, 200, 220)), F((300, 100, 320, 120))], None, "ok"),  # a small face in the background
        ([F((100, 100, 120, 125))], None, "face-too-small"),
        ([F((-60, 100, 60, 220))], None, "face-outside-frame"),
        ([F((400, 100, 500, 220))], (100, 100, 200, 220), "face-jumps"),
        ([F((110, 100, 210, 220))], (100, 100, 200, 220), "ok"),
    ],
)
def test_frame_verdicts(faces: list[F], previous: tuple | None, verdict: str) -> None:
    assert frame_verdict(faces, previous, 640, 360, RULES) == verdict


def test_verdict_runs_and_windows_account_for_every_second() -> None:
    runs = verdict_spans([0, 1, 2, 3, 4, 5], ["ok", "ok", "no-face", "ok", "ok", "ok"], 6.5)
    assert runs == [(Span(0, 2), "ok"), (Span(2, 3), "no-face"), (Span(3, 6.5), "ok")]
    usable = [Span(0, 2), Span(3, 25.0)]
    speech = [Span(3, 13), Span(20, 25)]
    kept, dropped = clip_windows(usable, speech, WindowRules(3.0, 10.0, 0.6))
    assert dropped[0] == (Span(0, 2), "too-short")
    assert [w.length for w in kept] == pytest.approx([22 / 3, 22 / 3])  # 22 s in 3 equal windows of <= 10 s
    assert [reason for _, reason in dropped[1:]] == ["little-speech"]
    total = sum(w.length for w in kept) + sum(s.length for s, _ in dropped)
    assert total == pytest.approx(sum(s.length for s in usable))


def test_boxes_interpolate_and_the_crop_covers_the_track_inside_the_frame() -> None:
    boxes = interpolate_boxes([0.0, 1.0], [(100, 100, 200, 220), (140, 100, 240, 220)], [0.0, 0.5, 1.0, 2.0])
    assert boxes[1] == pytest.approx((120, 100, 220, 220)) and boxes[3] == boxes[2]
    track = smooth(boxes, 3)
    crop = crop_for(track, 640, 360, "1:1", 256)
    assert crop.width == crop.height and (crop.out_width, crop.out_height) == (256, 256)
    assert crop.x0 >= 0 and crop.x0 + crop.width <= 640 and crop.y0 >= 0 and crop.y0 + crop.height <= 360
    for box in track:
        x0, y0, x1, y1 = crop.map_box(box)
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
    tall = crop_for(track, 640, 360, "9:16", 256)
    assert abs(tall.width / tall.height - 9 / 16) < 0.02 and tall.out_width == 256
    whole = crop_for(track, 640, 360, "keep", 256)
    assert (whole.x0, whole.y0, whole.width, whole.height, whole.out_height) == (0, 0, 640, 360, 256)
