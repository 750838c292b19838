"""Similarity alignment of five landmarks onto the ArcFace template."""

from __future__ import annotations

import math

import numpy as np
import pytest

from appliance.pipeline.align import (
    ARCFACE_TEMPLATE,
    CROP_SIZE,
    align_face,
    similarity_transform,
)


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def rotation(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def test_template_maps_with_identity() -> None:
    matrix = similarity_transform(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE)
    assert matrix.shape == (2, 3)
    np.testing.assert_allclose(matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-6)


def test_template_face_crop_is_top_left_112() -> None:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)
    crop = align_face(img, ARCFACE_TEMPLATE.copy())
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3)
    assert crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, img[:112, :112])


def test_scaled_and_shifted_template_recovers_scale_and_shift() -> None:
    # Face twice the template's size, moved by (+30, -10): the inverse is scale 0.5 and a
    # translation of -(30, -10) * 0.5 = (-15, +5).
    src = ARCFACE_TEMPLATE.astype(np.float64) * 2 + np.array([30.0, -10.0])
    matrix = similarity_transform(src.astype(np.float32), ARCFACE_TEMPLATE)
    np.testing.assert_allclose(matrix, [[0.5, 0, -15], [0, 0.5, 5]], atol=1e-4)


@pytest.mark.parametrize("degrees", [-90.0, -30.0, 15.0, 45.0, 170.0])
def test_rotation_recovered(degrees: float) -> None:
    theta = math.radians(degrees)
    shift = np.array([200.0, 150.0])
    src = ARCFACE_TEMPLATE.astype(np.float64) @ rotation(theta).T * 1.5 + shift
    matrix = similarity_transform(src.astype(np.float32), ARCFACE_TEMPLATE)
    # Undo: rotate by -theta and scale by 1/1.5.
    np.testing.assert_allclose(matrix[:, :2], rotation(-theta) / 1.5, atol=1e-4)
    np.testing.assert_allclose(apply(matrix, src), ARCFACE_TEMPLATE, atol=1e-3)


def test_rotated_image_aligns_back() -> None:
    # Paint the template region, rotate the image 90 degrees clockwise (and the landmarks with
    # it); the aligned crop must equal the unrotated crop.
    rng = np.random.default_rng(1)
    img = np.kron(rng.integers(0, 256, (14, 14, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    rotated = np.ascontiguousarray(np.rot90(img, k=-1))  # (x, y) -> (111 - y, x)
    pts = ARCFACE_TEMPLATE.astype(np.float64)
    rotated_pts = np.stack([111.0 - pts[:, 1], pts[:, 0]], axis=1).astype(np.float32)
    crop = align_face(rotated, rotated_pts)
    # Interpolation may blur the block edges by a pixel; the interiors are exact.
    diff = np.abs(crop.astype(int) - img.astype(int))
    assert np.median(diff) == 0
    assert diff.mean() < 3


def test_never_a_reflection() -> None:
    # Mirror the template left-right: the best similarity must still be a rotation.
    mirrored = ARCFACE_TEMPLATE.copy()
    mirrored[:, 0] = 112.0 - mirrored[:, 0]
    matrix = similarity_transform(mirrored, ARCFACE_TEMPLATE)
    assert np.linalg.det(matrix[:, :2]) > 0


@pytest.mark.parametrize("seed", range(5))
def test_random_landmarks_give_proper_similarity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 500, (5, 2)).astype(np.float32)
    m = similarity_transform(src, ARCFACE_TEMPLATE)[:, :2]
    assert np.linalg.det(m) > 0
    # A similarity: equal column norms, orthogonal columns.
    assert np.linalg.norm(m[:, 0]) == pytest.approx(np.linalg.norm(m[:, 1]))
    assert float(m[:, 0] @ m[:, 1]) == pytest.approx(0.0, abs=1e-9)


def test_larger_crop_size_scales_template() -> None:
    src = ARCFACE_TEMPLATE * 2
    img = np.zeros((300, 300, 3), np.uint8)
    img[100:, :] = 255
    crop = align_face(img, src, size=224)
    assert crop.shape == (224, 224, 3)
    # Template scaled to 224 equals src: identity, so the row-100 edge stays at row 100.
    assert (crop[:99] == 0).all()
    assert (crop[101:] == 255).all()
