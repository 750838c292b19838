"""SCRFD post-processing: anchors, distance decoding, NMS and end-to-end decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.models.demo import PlantedFace, planted_outputs
from appliance.pipeline.detect import (
    Detection,
    anchor_centers,
    decode_scrfd,
    distance_to_bbox,
    distance_to_keypoints,
    nms,
    split_outputs,
)

INPUT = (640, 640)


def test_anchor_centers_2x3_stride_8() -> None:
    expected = np.array(
        [
            [0, 0],
            [0, 0],
            [8, 0],
            [8, 0],
            [16, 0],
            [16, 0],
            [0, 8],
            [0, 8],
            [8, 8],
            [8, 8],
            [16, 8],
            [16, 8],
        ],
        dtype=np.float32,
    )
    centers = anchor_centers(2, 3, 8)
    assert centers.dtype == np.float32
    np.testing.assert_array_equal(centers, expected)


def test_anchor_centers_are_read_only_and_cached() -> None:
    a = anchor_centers(4, 5, 16)
    assert a.shape == (4 * 5 * 2, 2)
    assert a[-1].tolist() == [64.0, 48.0]  # last location: x = 4 * 16, y = 3 * 16
    assert anchor_centers(4, 5, 16) is a
    with pytest.raises(ValueError):
        a[0, 0] = 1.0


def test_distance_to_bbox_hand_case() -> None:
    points = np.array([[10.0, 20.0], [0.0, 0.0]], np.float32)
    distance = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 0.0, 0.0]], np.float32)
    expected = np.array([[9.0, 18.0, 13.0, 24.0], [-5.0, -5.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(distance_to_bbox(points, distance), expected)


def test_distance_to_keypoints_hand_case() -> None:
    points = np.array([[10.0, 20.0]], np.float32)
    distance = np.arange(1, 11, dtype=np.float32)[None]
    expected = np.array([[[11, 22], [13, 24], [15, 26], [17, 28], [19, 30]]], np.float32)
    out = distance_to_keypoints(points, distance)
    assert out.shape == (1, 5, 2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------- NMS


def test_nms_suppresses_heavy_overlap() -> None:
    # Both 10x10 with the +1 convention; intersection 9x10 = 90, IoU 90 / 110 = 0.82.
    boxes = np.array([[0, 0, 9, 9], [1, 0, 10, 9]], np.float32)
    assert nms(boxes, np.array([0.8, 0.9], np.float32), 0.4) == [1]


def test_nms_uses_plus_one_convention() -> None:
    # +1 pixels: intersection 6x10 = 60, union 140, IoU 0.43 > 0.4 -> suppressed.
    # (Without +1 it would be 45 / 117 = 0.38 and both would stay.)
    boxes = np.array([[0, 0, 9, 9], [4, 0, 13, 9]], np.float32)
    assert nms(boxes, np.array([0.9, 0.8], np.float32), 0.4) == [0]
    # Shift one more pixel: 50 / 150 = 0.33 -> kept.
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9]], np.float32)
    assert nms(boxes, np.array([0.9, 0.8], np.float32), 0.4) == [0, 1]


def test_nms_keeps_disjoint_in_score_order() -> None:
    boxes = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [200, 0, 210, 10]], np.float32)
    scores = np.array([0.5, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.4) == [1, 2, 0]


def test_nms_is_greedy() -> None:
    # A overlaps B, B overlaps C, A and C are disjoint: A (best) removes B, so C survives.
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [10, 0, 19, 9]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert nms(boxes, scores, 0.3) == [0, 2]


def test_nms_threshold_inclusive_and_empty() -> None:
    boxes = np.array([[0, 0, 9, 9], [1, 0, 10, 9]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    assert nms(boxes, scores, 0.9) == [0, 1]
    assert nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)) == []


# ---------------------------------------------------------------- decoding


def empty_outputs(input_size: tuple[int, int], keypoints: bool = True) -> list[np.ndarray]:
    return planted_outputs([], input_size, keypoints)


def test_decode_hand_built_outputs() -> None:
    # 64x64 input: stride 8 grid 8x8 (128 anchors). Anchor index (row 2, col 3, second anchor)
    # = (2 * 8 + 3) * 2 + 1 = 39, centre (24, 16).
    outputs = empty_outputs((64, 64))
    assert [o.shape[0] for o in outputs[:3]] == [128, 32, 8]
    outputs[0][39, 0] = 0.9
    outputs[3][39] = [1.0, 1.0, 2.0, 2.0]  # in strides: left/top 8 px, right/bottom 16 px
    outputs[6][39] = [0.5, -0.5, 1, 1, 0, 0, -1, 2, 0.25, 0.75]
    dets = decode_scrfd(outputs, (64, 64), threshold=0.5)
    assert len(dets) == 1
    det = dets[0]
    assert det.bbox == (16.0, 8.0, 40.0, 32.0)
    assert det.score == pytest.approx(0.9)
    assert det.width == 24.0
    assert det.height == 24.0
    expected_kps = [[28, 12], [32, 24], [24, 16], [16, 32], [26, 22]]
    np.testing.assert_allclose(det.landmarks, np.array(expected_kps, np.float32))


def test_decode_hand_built_stride_32() -> None:
    # Stride 32 on 64x64: 2x2 grid; anchor 6 = location (row 1, col 1), centre (32, 32).
    outputs = empty_outputs((64, 64))
    outputs[2][6, 0] = 0.7
    outputs[5][6] = [0.5, 0.25, 0.5, 0.75]
    dets = decode_scrfd(outputs, (64, 64), threshold=0.5)
    assert [d.bbox for d in dets] == [(16.0, 24.0, 48.0, 56.0)]


def test_decode_scale_maps_back_to_original() -> None:
    outputs = empty_outputs((64, 64))
    outputs[0][39, 0] = 0.9
    outputs[3][39] = [1.0, 1.0, 2.0, 2.0]
    outputs[6][39] = [0.0] * 10
    det = decode_scrfd(outputs, (64, 64), threshold=0.5, scale=0.5)[0]
    assert det.bbox == (32.0, 16.0, 80.0, 64.0)
    np.testing.assert_allclose(det.landmarks, np.tile([[48.0, 32.0]], (5, 1)))


PLANTED = (
    PlantedFace.square(100, 120, 40, score=0.91),  # stride 8
    PlantedFace.square(300, 80, 100, score=0.82),  # stride 16
    PlantedFace.square(250, 300, 300, score=0.97),  # stride 32
)


def assert_matches(det: Detection, face: PlantedFace, factor: float = 1.0) -> None:
    np.testing.assert_allclose(det.bbox, np.array(face.bbox) * factor, atol=1e-3)
    np.testing.assert_allclose(det.landmarks, np.array(face.landmarks) * factor, atol=1e-3)
    assert det.score == pytest.approx(face.score)


def test_decode_planted_faces_on_each_stride() -> None:
    outputs = planted_outputs(PLANTED, INPUT)
    # Each face is on the stride its size asks for.
    assert [int((o > 0.5).sum()) for o in outputs[:3]] == [1, 1, 1]
    dets = decode_scrfd(outputs, INPUT, threshold=0.5)
    assert [d.score for d in dets] == pytest.approx([0.97, 0.91, 0.82])
    assert_matches(dets[0], PLANTED[2])
    assert_matches(dets[1], PLANTED[0])
    assert_matches(dets[2], PLANTED[1])
    assert dets[0].bbox == pytest.approx((250.0, 300.0, 550.0, 600.0), abs=1e-3)


def test_decode_scale_half_doubles_coordinates() -> None:
    dets = decode_scrfd(planted_outputs(PLANTED, INPUT), INPUT, threshold=0.5, scale=0.5)
    assert_matches(dets[0], PLANTED[2], factor=2.0)
    assert dets[0].bbox == pytest.approx((500.0, 600.0, 1100.0, 1200.0), abs=1e-3)


def test_decode_score_threshold() -> None:
    outputs = planted_outputs(PLANTED, INPUT)
    assert len(decode_scrfd(outputs, INPUT, threshold=0.85)) == 2
    assert [d.score for d in decode_scrfd(outputs, INPUT, threshold=0.92)] == pytest.approx([0.97])
    assert decode_scrfd(outputs, INPUT, threshold=0.98) == []
    # The threshold is inclusive: a score equal to it is kept.
    exact = decode_scrfd(outputs, INPUT, threshold=np.float32(0.82).item())
    assert len(exact) == 3


def test_decode_without_keypoints() -> None:
    outputs = planted_outputs(PLANTED, INPUT, keypoints=False)
    assert len(outputs) == 6
    dets = decode_scrfd(outputs, INPUT, threshold=0.5)
    assert len(dets) == 3
    assert all(d.landmarks is None for d in dets)
    np.testing.assert_allclose(dets[0].bbox, PLANTED[2].bbox, atol=1e-3)


def test_decode_applies_nms() -> None:
    # Centres 120 and 128 px: neighbouring stride-8 anchors. IoU (+1) = 33*41 / (2*41*41 -
    # 33*41) = 0.67, so only the better one survives at 0.4; at 0.7 both do.
    faces = [PlantedFace.square(100, 100, 40, 0.9), PlantedFace.square(108, 100, 40, 0.8)]
    outputs = planted_outputs(faces, INPUT)
    dets = decode_scrfd(outputs, INPUT, threshold=0.5, nms_threshold=0.4)
    assert len(dets) == 1
    assert dets[0].score == pytest.approx(0.9)
    assert len(decode_scrfd(outputs, INPUT, threshold=0.5, nms_threshold=0.7)) == 2


def test_decode_non_square_input() -> None:
    size = (640, 480)
    face = PlantedFace.square(500, 380, 60, 0.9)
    dets = decode_scrfd(planted_outputs([face], size), size, threshold=0.5)
    assert len(dets) == 1
    assert_matches(dets[0], face)


def test_decode_nothing_above_threshold() -> None:
    assert decode_scrfd(empty_outputs(INPUT), INPUT, threshold=0.5) == []


def test_decode_wrong_anchor_count_is_helpful() -> None:
    outputs = planted_outputs(PLANTED, INPUT)
    with pytest.raises(ValueError, match="stride 8") as info:
        decode_scrfd(outputs, (320, 320), threshold=0.5)
    message = str(info.value)
    assert "12800 scores" in message  # 80 * 80 * 2 for a 640x640 model
    assert "3200 anchors" in message  # 40 * 40 * 2 expected at 320x320
    assert "320x320" in message


def test_decode_wrong_output_count() -> None:
    outputs = planted_outputs(PLANTED, INPUT)
    with pytest.raises(ValueError, match="6 or 9 outputs, got 8"):
        decode_scrfd(outputs[:8], INPUT, threshold=0.5)


def test_split_outputs_groups_by_meaning() -> None:
    outputs = [np.full((1,), i, np.float32) for i in range(9)]
    scores, boxes, kps = split_outputs(outputs)
    assert [int(a[0]) for a in scores] == [0, 1, 2]
    assert [int(a[0]) for a in boxes] == [3, 4, 5]
    assert kps is not None
    assert [int(a[0]) for a in kps] == [6, 7, 8]
    assert split_outputs(outputs[:6])[2] is None


@settings(max_examples=60, deadline=None)
@given(
    cx=st.floats(20, 620),
    cy=st.floats(20, 620),
    w=st.floats(12, 400),
    h=st.floats(12, 400),
    score=st.floats(0.55, 1.0),
    kp=st.lists(st.floats(-0.5, 0.5), min_size=10, max_size=10),
)
def test_planted_box_round_trips(
    cx: float, cy: float, w: float, h: float, score: float, kp: list[float]
) -> None:
    bbox = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    landmarks = tuple((cx + kp[2 * i] * w, cy + kp[2 * i + 1] * h) for i in range(5))
    face = PlantedFace(bbox=bbox, landmarks=landmarks, score=score)
    dets = decode_scrfd(planted_outputs([face], INPUT), INPUT, threshold=0.5)
    assert len(dets) == 1
    np.testing.assert_allclose(dets[0].bbox, bbox, atol=1e-3, rtol=0)
    np.testing.assert_allclose(dets[0].landmarks, np.array(landmarks), atol=1e-3, rtol=0)
    assert dets[0].score == pytest.approx(score, abs=1e-6)
