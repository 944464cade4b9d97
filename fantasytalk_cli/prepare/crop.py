"""One crop per clip: a box of the asked aspect that covers the clip's smoothed face track with a margin, kept
inside the frame, and the scale that brings its short side to `--size`; and the track mapped into the clip's
pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fantasytalk_cli.prepare.spans import Box

Aspect = Literal["keep", "1:1", "9:16", "16:9"]
ASPECTS: dict[str, float | None] = {"keep": None, "1:1": 1.0, "9:16": 9 / 16, "16:9": 16 / 9}
"""Width / height of each `--aspect` (keep: the source's, the whole frame)."""


@dataclass(frozen=True)
class Crop:
    """A crop of the source frame (integer pixels) and the clip size it is resized to (even sides: H.264)."""

    x0: int
    y0: int
    width: int
    height: int
    out_width: int
    out_height: int

    def map_box(self, box: Box) -> Box:
        """A source-frame box in the clip's pixels."""
        sx, sy = self.out_width / self.width, self.out_height / self.height
        return ((box[0] - self.x0) * sx, (box[1] - self.y0) * sy, (box[2] - self.x0) * sx, (box[3] - self.y0) * sy)


def smooth(boxes: Sequence[Box], frames: int) -> list[Box]:
    """A centred moving average over ``frames`` frames (odd; the ends use what they have)."""
    data = np.asarray(boxes, dtype=np.float64)
    half = max(0, frames // 2)
    out = [data[max(0, i - half) : i + half + 1].mean(axis=0) for i in range(len(data))]
    return [(float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in out]


def crop_for(boxes: Sequence[Box], frame_width: int, frame_height: int, aspect: Aspect, size: int,
             margin: float = 0.8) -> Crop:  # fmt: skip
    """The crop that covers every box of the (smoothed) track, each grown by ``margin`` face heights above and
    below and as much sideways, at ``aspect``, moved (not shrunk) to stay inside the frame, shrunk only where the
    frame is too small; resized so the short side is ``size`` (even sides)."""
    ratio = ASPECTS[aspect]
    if ratio is None:
        x0, y0, width, height = 0, 0, frame_width, frame_height
    else:
        data = np.asarray(boxes, dtype=np.float64)
        face = float(np.median(data[:, 3] - data[:, 1]))
        left, top = data[:, 0].min() - margin * face, data[:, 1].min() - margin * face
        right, bottom = data[:, 2].max() + margin * face, data[:, 3].max() + margin * face
        height_f = max(bottom - top, (right - left) / ratio)
        width_f = height_f * ratio
        scale = min(1.0, frame_width / width_f, frame_height / height_f)
        width, height = int(width_f * scale), int(height_f * scale)
        cx, cy = (left + right) / 2, (top + bottom) / 2
        x0 = int(round(min(max(cx - width / 2, 0), frame_width - width)))
        y0 = int(round(min(max(cy - height / 2, 0), frame_height - height)))
    short = min(width, height)
    out_w, out_h = _even(width * size / short), _even(height * size / short)
    return Crop(x0, y0, width, height, out_w, out_h)


def _even(value: float) -> int:
    return max(2, int(round(value / 2)) * 2)
