"""Face and mouth tracks (`docs/prepare.md#the-track-format`) as loss weights on the latent grid, for the
lip-focused second stage: each sample frame's boxes go through exactly the transform its pixels go through (resize
to cover the bucket, centre crop: `buckets.cover_crop`), then onto the VAE's latent cells (latent frame 0 is frame 0
alone, each later one the next 4 frames; 8 pixels a cell), as ``1 + face_weight`` on face cells plus ``lip_weight``
on mouth cells (the paper's lip mask as a weight; the common 1 + w form).

Pure functions on numbers; reading a track file checks its format and names the file and field when it is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fantasytalk_cli.data.buckets import cover_crop
from fantasytalk_cli.data.metadata import MetadataEntry, resolve_media_path
from fantasytalk_cli.errors import FtalkError

TRACK_FORMAT = "ftalk-face-track/1"
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8
Box = tuple[float, float, float, float]


class TrackError(FtalkError):
    """A track file that cannot be used: names the file, the field and the fix."""


@dataclass(frozen=True)
class Track:
    """Per clip frame, the face and the mouth box in the clip's pixels."""

    width: int
    height: int
    face: list[Box]
    mouth: list[Box]


def track_document(
    *, fps: float, width: int, height: int, face: Sequence[Box], mouth: Sequence[Box], **provenance: object
) -> dict[str, object]:
    """A track file's JSON (the format `read_track` reads): per clip frame a face and a mouth box in the clip's
    ``width`` x ``height`` pixels, rounded to 0.01 px; ``provenance`` (where the clip came from) is kept as given."""
    if len(face) != len(mouth):
        raise ValueError(f"one face and one mouth box per frame: got {len(face)} and {len(mouth)}")
    return {
        "format": TRACK_FORMAT,
        "fps": fps,
        "width": width,
        "height": height,
        **provenance,
        "face": [[round(float(v), 2) for v in box] for box in face],
        "mouth": [[round(float(v), 2) for v in box] for box in mouth],
    }


@dataclass(frozen=True)
class TrackCoverage:
    """Which metadata entries carry a usable `track`: ``untracked`` name none, ``lost`` name a missing file."""

    total: int
    untracked: list[MetadataEntry]
    lost: list[MetadataEntry]

    @property
    def tracked(self) -> int:
        return self.total - len(self.untracked) - len(self.lost)


def track_coverage(entries: Sequence[MetadataEntry], media_root: Path | None) -> TrackCoverage:
    """Count the entries with a track file that exists (paths resolve as the entry's media do)."""
    untracked = [e for e in entries if not e.extra.get("track")]
    lost = [e for e in entries if e.extra.get("track") and not resolve_media_path(media_root,
            str(e.extra["track"])).is_file()]  # fmt: skip
    return TrackCoverage(len(entries), untracked, lost)


def read_track(path: Path) -> Track:
    """A track file written by `ftalk prepare` (or by hand in its format)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TrackError(f"{path}: cannot read the track ({exc}); rerun `ftalk prepare` or fix the file") from exc
    if not isinstance(data, dict) or data.get("format") != TRACK_FORMAT:
        raise TrackError(f"{path}: `format` must be {TRACK_FORMAT!r}; write tracks with `ftalk prepare`")
    boxes = {}
    for name in ("face", "mouth"):
        value = data.get(name)
        if not isinstance(value, list) or not all(isinstance(b, list) and len(b) == 4 for b in value):
            raise TrackError(f"{path}: `{name}` must be a list of [x0, y0, x1, y1] boxes, one per clip frame")
        boxes[name] = [(float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in value]
    if len(boxes["face"]) != len(boxes["mouth"]):
        raise TrackError(f"{path}: `face` has {len(boxes['face'])} boxes and `mouth` {len(boxes['mouth'])}")
    try:
        width, height = int(data["width"]), int(data["height"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TrackError(f"{path}: `width` and `height` (the clip's pixels) must be integers") from exc
    return Track(width, height, boxes["face"], boxes["mouth"])


def box_in_bucket(box: Box, src_height: int, src_width: int, height: int, width: int) -> Box:
    """A box in a clip's pixels, in the bucket's pixels after resize-to-cover and centre crop (clamped)."""
    crop = cover_crop(src_height, src_width, height, width)
    sx, sy = crop.resize_width / src_width, crop.resize_height / src_height
    x0, y0 = box[0] * sx - crop.left, box[1] * sy - crop.top
    x1, y1 = box[2] * sx - crop.left, box[3] * sy - crop.top
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def latent_groups(frames: int) -> list[list[int]]:
    """Sample frames per latent frame: [0], then [1..4], [5..8], ... (the VAE's causal 4x time stride)."""
    return [[0]] + [
        list(range(1 + TEMPORAL_STRIDE * t, 1 + TEMPORAL_STRIDE * (t + 1))) for t in range((frames - 1) // 4)
    ]


def cell_mask(boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """[height/8, width/8] booleans: the latent cells whose centre lies in any of ``boxes`` (bucket pixels)."""
    rows, cols = height // SPATIAL_STRIDE, width // SPATIAL_STRIDE
    cy = (np.arange(rows) + 0.5) * SPATIAL_STRIDE
    cx = (np.arange(cols) + 0.5) * SPATIAL_STRIDE
    mask = np.zeros((rows, cols), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask |= ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
    return mask


def latent_weights(
    track: Track,
    source_frames: Sequence[int],
    height: int,
    width: int,
    *,
    face_weight: float,
    lip_weight: float,
) -> np.ndarray:
    """float32 [T_lat, height/8, width/8]: ``1 + face_weight`` on the cells a latent frame's face boxes cover,
    ``+ lip_weight`` on its mouth boxes' cells, 1 elsewhere. ``source_frames``: the clip frame of each sample frame
    (the sample's window: start + k * stride)."""
    if len(source_frames) < 1 or (len(source_frames) - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"a sample has 4k+1 frames, not {len(source_frames)}")
    last = len(track.face) - 1
    weights = []
    for group in latent_groups(len(source_frames)):
        frames = [min(source_frames[k], last) for k in group]
        face = [box_in_bucket(track.face[f], track.height, track.width, height, width) for f in frames]
        mouth = [box_in_bucket(track.mouth[f], track.height, track.width, height, width) for f in frames]
        weights.append(
            1.0 + face_weight * cell_mask(face, height, width) + lip_weight * cell_mask(mouth, height, width)
        )
    return np.stack(weights).astype(np.float32)
