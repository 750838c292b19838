"""ArcFace pre/post-processing: blob layout and scaling, L2 normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.models.registry import ARCFACE_PREPROCESS, SCRFD_PREPROCESS, Preprocess
from appliance.pipeline.embed import normalize, to_blob


def test_blob_shape_and_layout_single_image() -> None:
    img = np.zeros((4, 6, 3), np.uint8)  # H=4, W=6
    img[1, 5] = (10, 20, 30)  # B, G, R
    blob = to_blob(img, ARCFACE_PREPROCESS)
    assert blob.shape == (1, 3, 4, 6)
    assert blob.dtype == np.float32
    assert blob.flags["C_CONTIGUOUS"]
    # RGB order: channel 0 is red.
    expected = [(30 - 127.5) / 127.5, (20 - 127.5) / 127.5, (10 - 127.5) / 127.5]
    np.testing.assert_allclose(blob[0, :, 1, 5], expected, rtol=1e-6)
    # Every other pixel is 0 -> -1.
    assert blob[0, :, 0, 0] == pytest.approx([-1.0, -1.0, -1.0])


def test_blob_value_range() -> None:
    img = np.array([[[0, 255, 127]]], np.uint8)
    blob = to_blob(img, ARCFACE_PREPROCESS)
    np.testing.assert_allclose(blob[0, :, 0, 0], [-0.5 / 127.5, 1.0, -1.0], atol=1e-6)


def test_blob_batch_of_list_keeps_order() -> None:
    a = np.full((112, 112, 3), 0, np.uint8)
    b = np.full((112, 112, 3), 255, np.uint8)
    blob = to_blob([a, b, a], ARCFACE_PREPROCESS)
    assert blob.shape == (3, 3, 112, 112)
    assert (blob[0] == -1).all()
    assert (blob[1] == 1).all()
    assert (blob[2] == -1).all()


def test_blob_from_4d_array() -> None:
    batch = np.zeros((2, 5, 7, 3), np.uint8)
    batch[1, 4, 6, 0] = 255  # blue of the last pixel of the second image
    blob = to_blob(batch, ARCFACE_PREPROCESS)
    assert blob.shape == (2, 3, 5, 7)
    assert blob[1, 2, 4, 6] == pytest.approx(1.0)  # blue lands in channel 2 (RGB)
    assert blob[1, 0, 4, 6] == pytest.approx(-1.0)


def test_blob_scrfd_scaling() -> None:
    img = np.array([[[255, 0, 128]]], np.uint8)
    blob = to_blob(img, SCRFD_PREPROCESS)
    np.testing.assert_allclose(blob[0, :, 0, 0], [0.5 / 128, -127.5 / 128, 127.5 / 128], rtol=1e-6)


def test_blob_bgr_and_raw_when_asked() -> None:
    img = np.array([[[10, 20, 30]]], np.uint8)
    blob = to_blob(img, Preprocess(mean=0.0, std=1.0, rgb=False))
    np.testing.assert_array_equal(blob[0, :, 0, 0], [10.0, 20.0, 30.0])
    raw = to_blob(img, Preprocess(mean=0.0, std=1.0))
    np.testing.assert_array_equal(raw[0, :, 0, 0], [30.0, 20.0, 10.0])


def test_normalize_unit_rows_and_norms() -> None:
    emb = np.array([[3.0, 4.0], [0.0, -2.0], [1.0, 0.0]], np.float32)
    unit, norms = normalize(emb)
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, -1.0], [1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(norms, [5.0, 2.0, 1.0], rtol=1e-6)
    assert unit.dtype == np.float32
    assert norms.dtype == np.float32


def test_normalize_zero_vector_is_safe() -> None:
    emb = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
    with np.errstate(all="raise"):
        unit, norms = normalize(emb)
    np.testing.assert_array_equal(unit, [[0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(norms, [0.0, 2.0])


def test_normalize_flattens_trailing_axes() -> None:
    emb = np.ones((2, 1, 512), np.float32)
    unit, norms = normalize(emb)
    assert unit.shape == (2, 512)
    np.testing.assert_allclose(norms, [np.sqrt(512)] * 2, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), [1.0, 1.0], rtol=1e-6)
