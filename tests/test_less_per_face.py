"""Less work per face: batched alignment, one recognizer submission per request, no
recognizer work unless asked; and the reduced-scale JPEG decode, measured against the full one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from appliance.pipeline.align import (
    ARCFACE_TEMPLATE,
    align_face,
    align_faces,
    similarity_transform,
    similarity_transforms,
)
from appliance.pipeline.faces import AnalyzeOptions
from appliance.pipeline.images import ImageDecoder, dct_scale
from appliance.pipeline.nvjpeg import load as load_nvjpeg
from tests.golden import real_analyzer, real_settings

TURBO_FACTORS = frozenset({(1, 8), (1, 4), (3, 8), (1, 2), (5, 8), (3, 4), (7, 8), (1, 1)})


def test_batched_alignment_equals_one_face_at_a_time() -> None:
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    points = []
    for k in range(9):
        theta = rng.uniform(-math.pi, math.pi)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        scale = rng.uniform(0.3, 3.0)
        shift = rng.uniform(50, 400, 2)
        pts = ARCFACE_TEMPLATE @ rot.T * scale + shift
        if k == 4:
            pts = pts[:, ::-1]  # a mirrored face: still a rotation, never a reflection
        points.append(pts.astype(np.float32))
    landmarks = np.stack(points)
    matrices = similarity_transforms(landmarks, ARCFACE_TEMPLATE)
    crops = align_faces(img, landmarks)
    assert crops.shape == (9, 112, 112, 3) and crops.dtype == np.uint8
    for k in range(9):
        np.testing.assert_allclose(
            matrices[k], similarity_transform(landmarks[k], ARCFACE_TEMPLATE), atol=1e-9
        )
        np.testing.assert_array_equal(crops[k], align_face(img, landmarks[k]))
    assert align_faces(img, np.empty((0, 5, 2), np.float32)).shape == (0, 112, 112, 3)


async def test_no_recognizer_work_without_embeddings_or_face_data(
    real_models: Path, photos: Path
) -> None:
    img = ImageDecoder.create(50_000_000).decode((photos / "t1.jpg").read_bytes())
    async with real_analyzer(real_settings(real_models)) as (analyzer, _):
        assert analyzer.recognizer is not None
        rec = analyzer.recognizer.batcher
        options = AnalyzeOptions(threshold=0.5, extract_embedding=False, return_face_data=False)
        faces = (await analyzer.analyze(img, options)).faces
        assert len(faces) == 6
        assert all(f.vec is None and f.crop is None for f in faces)
        assert rec.items_run == 0
        # Face data alone aligns but still runs no recognizer.
        crops_only = AnalyzeOptions(threshold=0.5, extract_embedding=False, return_face_data=True)
        faces = (await analyzer.analyze(img, crops_only)).faces
        assert all(f.crop is not None and f.crop.shape == (112, 112, 3) for f in faces)
        assert rec.items_run == 0


async def test_all_images_of_a_request_are_embedded_in_one_submission(
    real_models: Path, photos: Path
) -> None:
    decoder = ImageDecoder.create(50_000_000)
    images = [
        decoder.decode((photos / name).read_bytes())
        for name in ("t1.jpg", "probe/two_people.jpg", "probe/obama1.jpg")
    ]
    options = AnalyzeOptions(threshold=0.5)
    settings = real_settings(real_models, rec_batch_size=16, rec_workers=1, det_workers=1)
    async with real_analyzer(settings) as (analyzer, _):
        assert analyzer.recognizer is not None
        rec = analyzer.recognizer.batcher
        alone = [(await analyzer.analyze(img, options)).faces for img in images]
        before = (rec.batches_run, rec.items_run)
        together = await analyzer.analyze_many(images, options)
        faces = sum(len(f) for f in alone)
        assert faces == 6 + 2 + 1
        # One submission of all nine crops: the batcher runs them as one batch.
        assert (rec.batches_run - before[0], rec.items_run - before[1]) == (1, faces)
    for one, many in zip(alone, together, strict=True):
        assert len(one) == len(many.faces)
        for a, b in zip(one, many.faces, strict=True):
            assert a.bbox == b.bbox
            assert a.vec is not None and b.vec is not None
            assert float(a.vec @ b.vec) > 1 - 1e-5


def test_dct_scale_picks_the_fast_factor_that_still_covers_the_letterbox() -> None:
    fit = (640, 640)
    assert dct_scale(1280, 886, 1, fit, 1.0, TURBO_FACTORS) == (1, 2)  # exactly 2x: 1/2
    assert dct_scale(1200, 1200, 1, fit, 1.0, TURBO_FACTORS) is None  # under 2x: full decode
    assert dct_scale(4000, 3000, 1, fit, 1.0, TURBO_FACTORS) == (1, 4)  # 1/8 would undershoot
    assert dct_scale(6000, 6000, 1, fit, 1.0, TURBO_FACTORS) == (1, 8)
    assert dct_scale(6000, 6000, 1, fit, 2.0, TURBO_FACTORS) == (1, 4)
    # EXIF-rotated: the letterbox sees the upright size.
    assert dct_scale(3000, 1000, 1, (320, 640), 1.0, TURBO_FACTORS) == (1, 8)
    assert dct_scale(3000, 1000, 6, (320, 640), 1.0, TURBO_FACTORS) == (1, 4)
    # Slow scaled IDCTs are never chosen: 3/8 would cover 1800 px, 1/2 is taken.
    assert dct_scale(1800, 1800, 1, fit, 1.0, TURBO_FACTORS) == (1, 2)


async def test_reduced_decode_finds_the_same_faces_as_measured(
    real_models: Path, photos: Path
) -> None:
    """docs/BENCHMARKS.md: at 1/2 scale the same faces, boxes within 1.5 px of the full
    decode, similarities down to 0.94 (which is why JPEG_DCT_SCALING is off by default)."""
    decoder = ImageDecoder.create(50_000_000)
    if decoder.turbo is None:
        pytest.skip("libturbojpeg is not installed: no DCT scaling")
    data = (photos / "t1.jpg").read_bytes()
    reduced = decoder.decode_for(data, (640, 640))
    assert reduced.pixels.shape == (443, 640, 3)
    assert (reduced.scale_x, reduced.scale_y) == (0.5, 443 / 886)
    assert decoder.decode_for(data, (320, 320)).pixels.shape == (222, 320, 3)
    options = AnalyzeOptions(threshold=0.5)
    async with real_analyzer(real_settings(real_models)) as (analyzer, _):
        full = (await analyzer.analyze(decoder.decode(data), options)).faces
        small = (await analyzer.analyze(reduced, options)).faces
    assert len(full) == len(small) == 6
    for a, b in zip(full, small, strict=True):
        assert np.abs(np.subtract(a.bbox, b.bbox)).max() < 1.5
        assert a.vec is not None and b.vec is not None
        assert float(a.vec @ b.vec) > 0.9


def test_nvjpeg_reports_why_it_is_not_used_here() -> None:
    assert load_nvjpeg(False) == (None, "off (USE_NVJPEG=0)")
    decoder, status = load_nvjpeg(True)
    if decoder is not None:
        pytest.skip("nvImageCodec with a GPU is present on this host")
    assert status.startswith("not available: ")
    cpu = ImageDecoder.create(1_000_000, use_nvjpeg=True)
    assert cpu.gpu is None and cpu.nvjpeg_status == status
    assert cpu.jpeg_library in ("turbojpeg", "opencv")
