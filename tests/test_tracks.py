"""Face/mouth tracks as latent loss weights: a known mouth box lands on the latent cells it covers after the
bucket's resize-to-cover, centre crop and the VAE's downsampling (±1 cell), for buckets that crop either side,
portrait and landscape; the temporal grouping is the VAE's (frame 0 alone, then 4 by 4); bad files are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.metadata_write import write_entries_atomic
from fantasytalk_cli.data.tracks import (
    TRACK_FORMAT,
    Track,
    TrackError,
    latent_groups,
    latent_weights,
    read_track,
)
from fantasytalk_cli.planning.report import make_plan_report
from tests.tiny_world import world_config


def _expected_cells(box: tuple[float, ...], src: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, ...]:
    """The mouth box's cell range computed independently: scale by the covering factor, shift by the centred
    crop's offset, divide by 8."""
    (sh, sw), (h, w) = src, bucket
    scale = max(h / sh, w / sw)
    top, left = (sh * scale - h) / 2, (sw * scale - w) / 2
    x0, y0, x1, y1 = box
    return tuple(round(v / 8) for v in (x0 * scale - left, y0 * scale - top, x1 * scale - left, y1 * scale - top))


@pytest.mark.parametrize(
    ("src", "bucket"),
    [
        ((512, 512), (512, 512)),  # same size
        ((720, 1280), (512, 512)),  # landscape clip into a square bucket: crops the sides
        ((1280, 720), (512, 512)),  # portrait clip: crops top and bottom
        ((720, 1280), (480, 832)),  # landscape into landscape
        ((960, 540), (832, 480)),  # portrait into portrait
        ((512, 512), (480, 832)),  # square into landscape: crops top and bottom
    ],
)
def test_a_known_mouth_box_lands_on_its_latent_cells(src: tuple[int, int], bucket: tuple[int, int]) -> None:
    sh, sw = src
    mouth = (0.42 * sw, 0.55 * sh, 0.58 * sw, 0.66 * sh)
    face = (0.3 * sw, 0.25 * sh, 0.7 * sw, 0.75 * sh)
    track = Track(width=sw, height=sh, face=[face] * 9, mouth=[mouth] * 9)
    weights = latent_weights(track, list(range(9)), *bucket, face_weight=0.0, lip_weight=2.0)
    assert weights.shape == (3, bucket[0] // 8, bucket[1] // 8)
    for latent in weights:
        rows, cols = np.nonzero(latent > 1)
        got = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        want = _expected_cells(mouth, src, bucket)
        assert max(abs(g - e) for g, e in zip(got, want, strict=True)) <= 1, (got, want)
        assert set(np.unique(latent)) == {1.0, 3.0}


def test_weights_add_face_and_lip_and_follow_the_vae_time_groups() -> None:
    assert latent_groups(9) == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    still = (0.0, 0.0, 1.0, 1.0)
    moving = [(10.0 + 40 * k, 10.0, 30.0 + 40 * k, 30.0) for k in range(9)]
    track = Track(width=400, height=64, face=moving, mouth=[still] * 9)
    weights = latent_weights(track, list(range(9)), 64, 400, face_weight=0.5, lip_weight=1.0)
    assert weights.max() == pytest.approx(1.5)
    first = np.nonzero(weights[0, 2] > 1)[0]
    assert first.min() >= 1 and first.max() <= 3  # frame 0 alone: x 10..30
    second = np.nonzero(weights[1, 2] > 1)[0]
    assert second.min() <= 7 and second.max() >= 19  # frames 1..4 together: x 50..190
    stride_two = latent_weights(track, [0, 2, 4, 6, 8, 8, 8, 8, 8], 64, 400, face_weight=0.5, lip_weight=0.0)
    assert not np.array_equal(stride_two[1], weights[1])  # the sample's own frames, not the clip's first ones


def test_bad_track_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(TrackError, match="`format` must be"):
        read_track(path)
    path.write_text(json.dumps({"format": TRACK_FORMAT, "face": [[0, 0, 1]], "mouth": []}))
    with pytest.raises(TrackError, match="`face` must be a list"):
        read_track(path)
    path.write_text(json.dumps({"format": TRACK_FORMAT, "width": 8, "height": 8, "face": [[0, 0, 1, 1]],
                                "mouth": [[0, 0, 1, 1]]}))  # fmt: skip
    assert read_track(path) == Track(8, 8, [(0.0, 0.0, 1.0, 1.0)], [(0.0, 0.0, 1.0, 1.0)])


def test_plan_buckets_counts_the_planned_clips_with_a_track(tiny_world: dict, tmp_path: Path) -> None:
    """`plan-buckets` says how many planned clips carry a track, what the stage-2 weights do with the rest, and
    names a track file that is missing."""
    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)

    def notes(**flags: object) -> list[str]:
        cfg = world_config({**tiny_world, "data": data, "clean": data / "clean.json"}, tmp_path / "run", **flags)
        return [n for n in make_plan_report(cfg).notes if n.startswith("face/mouth tracks")]

    assert notes() == [
        "face/mouth tracks: 6 of 6 planned clips have one (used by --lip_loss_weight / --face_loss_weight, the "
        "lip-focused stage 2)"
    ]
    entries = load_entries(data / "clean.json")
    del entries[0].extra["track"]
    entries[1].extra["track"] = "tracks/gone.json"
    write_entries_atomic(data / "clean.json", entries)
    assert notes(lip_loss_weight=1.0) == [
        "face/mouth tracks: 4 of 6 planned clips have one; 1 name a missing file (e.g. tracks/gone.json: train "
        "refuses them); the other 1 train with loss weight 1"
    ]
    assert notes(lip_loss_weight=1.0, require_tracks=True)[0].endswith("the other 1 refused by --require_tracks")
    for entry in entries:
        entry.extra.pop("track", None)
    write_entries_atomic(data / "clean.json", entries)
    assert notes() == []  # nothing tracked, nothing weighted: no line
