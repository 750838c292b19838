"""SCRFD post-processing: anchor centres, distance decoding, threshold, NMS, letterbox undo.

SCRFD predicts, for every anchor of the strides 8, 16 and 32 (two anchors per location), a
score and distances (in units of the stride) from the anchor centre to the four box sides
and to the five landmarks. Anchor centres sit at (x * stride, y * stride) on the letterboxed
input, the same convention as InsightFace's reference code, so boxes match it exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

STRIDES = (8, 16, 32)
ANCHORS_PER_LOCATION = 2
NMS_THRESHOLD = 0.4


@dataclasses.dataclass(frozen=True)
class Detection:
    """One face in original-image pixel coordinates."""

    bbox: tuple[float, float, float, float]
    score: float
    landmarks: FloatArray | None  # (5, 2)

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]


@functools.lru_cache(maxsize=32)
def anchor_centers(height: int, width: int, stride: int) -> FloatArray:
    """(height * width * 2, 2) anchor centres (x, y), location-major, anchors adjacent."""
    ys, xs = np.mgrid[:height, :width]
    centers = np.stack([xs, ys], axis=-1).astype(np.float32).reshape(-1, 2) * stride
    centers = np.repeat(centers, ANCHORS_PER_LOCATION, axis=0)
    centers.setflags(write=False)
    return centers


def distance_to_bbox(points: FloatArray, distance: FloatArray) -> FloatArray:
    """Boxes (x1, y1, x2, y2) from centres and (left, top, right, bottom) distances in pixels."""
    return np.stack(
        [
            points[:, 0] - distance[:, 0],
            points[:, 1] - distance[:, 1],
            points[:, 0] + distance[:, 2],
            points[:, 1] + distance[:, 3],
        ],
        axis=-1,
    )


def distance_to_keypoints(points: FloatArray, distance: FloatArray) -> FloatArray:
    """(N, 5, 2) landmarks from centres and (dx, dy) offsets in pixels."""
    offsets = distance.reshape(distance.shape[0], -1, 2)
    return (points[:, None, :] + offsets).astype(np.float32)


def nms(boxes: FloatArray, scores: FloatArray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices by descending score.

    Areas use the +1 pixel convention of InsightFace's SCRFD so suppression decisions match.
    A box is dropped when its overlap with a kept one exceeds `threshold`. Tied scores keep
    their input order (a stable sort of the negated scores): `argsort()[::-1]` would reverse
    them and, being unstable, differ between runs of numpy's sort.
    """
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= threshold]
    return keep


def split_outputs(
    outputs: list[FloatArray], num_strides: int = len(STRIDES)
) -> tuple[list[FloatArray], list[FloatArray], list[FloatArray] | None]:
    """Group one image's ordered outputs into (scores, boxes, keypoints-or-None) per stride."""
    if len(outputs) not in (2 * num_strides, 3 * num_strides):
        raise ValueError(f"SCRFD has 6 or 9 outputs, got {len(outputs)}")
    scores = outputs[:num_strides]
    boxes = outputs[num_strides : 2 * num_strides]
    kps = outputs[2 * num_strides :] if len(outputs) == 3 * num_strides else None
    return scores, boxes, kps


def decode_scrfd(
    outputs: list[FloatArray],
    input_size: tuple[int, int],
    threshold: float,
    scale: float = 1.0,
    nms_threshold: float = NMS_THRESHOLD,
) -> list[Detection]:
    """Decode one image's SCRFD outputs (in s8, s16, s32 order) into detections.

    `input_size` is the detector input (width, height); `scale` the letterbox factor, by which
    decoded coordinates are divided to land in the original image.
    """
    width, height = input_size
    scores_by_stride, boxes_by_stride, kps_by_stride = split_outputs(outputs)
    all_scores, all_boxes, all_kps = [], [], []
    for i, stride in enumerate(STRIDES):
        centers = anchor_centers(height // stride, width // stride, stride)
        scores = scores_by_stride[i].reshape(-1)
        if scores.shape[0] != centers.shape[0]:
            raise ValueError(
                f"stride {stride}: {scores.shape[0]} scores for {centers.shape[0]} anchors; "
                f"does the model's input size match {width}x{height}?"
            )
        pos = np.where(scores >= threshold)[0]
        if pos.size == 0:
            continue
        box_dist = boxes_by_stride[i].reshape(-1, 4)[pos] * stride
        all_scores.append(scores[pos])
        all_boxes.append(distance_to_bbox(centers[pos], box_dist))
        if kps_by_stride is not None:
            kps_dist = kps_by_stride[i].reshape(-1, 10)[pos] * stride
            all_kps.append(distance_to_keypoints(centers[pos], kps_dist))
    if not all_scores:
        return []
    scores = np.concatenate(all_scores).astype(np.float32)
    boxes = (np.concatenate(all_boxes) / scale).astype(np.float32)
    kps = (np.concatenate(all_kps) / scale).astype(np.float32) if all_kps else None
    keep = nms(boxes, scores, nms_threshold)
    return [
        Detection(
            bbox=(float(boxes[k, 0]), float(boxes[k, 1]), float(boxes[k, 2]), float(boxes[k, 3])),
            score=float(scores[k]),
            landmarks=kps[k] if kps is not None else None,
        )
        for k in keep
    ]
