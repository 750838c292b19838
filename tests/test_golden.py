"""Golden tests: the real trained networks on real photos against the reference results.

`../shared/photos/reference.json` was computed by InsightFace 2.1 (SCRFD at det_thresh 0.5,
nms 0.4, 640x640; norm_crop; MobileFaceNet on the RGB crop). Matching it is the proof that
decoding, letterbox, colour order, normalisation, alignment and embedding are right: the
generated demo detector ignores its input and could prove none of that.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from appliance.pipeline.detect import nms
from appliance.pipeline.faces import AnalyzeOptions, Face
from tests.golden import (
    REFERENCE_DET_THRESHOLD,
    SCORE_TOL,
    SIMILARITY_TOL,
    SUBPIXEL_TOL,
    best_similarity,
    decode,
    match,
    max_abs_diff,
    real_analyzer,
    real_settings,
)
from tests.real_data import PHOTOS, load_reference

REFERENCE_OPTIONS = AnalyzeOptions(threshold=REFERENCE_DET_THRESHOLD)


def reference_photos() -> list[str]:
    if not (PHOTOS / "reference.json").is_file():
        return ["(no reference.json)"]
    return sorted(load_reference(PHOTOS)["images"])


@pytest.fixture(scope="module")
def reference(photos: Path) -> dict[str, Any]:
    return load_reference(photos)


async def analyze_all(
    settings_dir: Path, photos: Path, keys: list[str], **overrides: Any
) -> dict[str, list[Face]]:
    async with real_analyzer(real_settings(settings_dir, **overrides)) as (analyzer, _):
        results = {}
        for key in keys:
            img = decode(photos.parent / key)
            results[key] = (await analyzer.analyze(img, REFERENCE_OPTIONS)).faces
        return results


@pytest.mark.parametrize("key", reference_photos())
async def test_faces_match_the_reference_to_a_hundredth_of_a_pixel(
    real_models: Path, photos: Path, reference: dict[str, Any], key: str
) -> None:
    expected = reference["images"][key]["faces"]
    faces = (await analyze_all(real_models, photos, [key]))[key]
    assert len(faces) == len(expected)
    order = match([f.bbox for f in faces], [e["bbox"] for e in expected])
    for e, i in zip(expected, order, strict=True):
        face = faces[i]
        assert max_abs_diff(face.bbox, e["bbox"]) <= SUBPIXEL_TOL
        assert face.landmarks is not None
        assert max_abs_diff(face.landmarks, e["landmarks"]) <= SUBPIXEL_TOL
        assert abs(face.prob - e["score"]) <= SCORE_TOL
        assert face.vec is not None and face.vec.shape == (128,)
        assert abs(float(np.linalg.norm(face.vec)) - 1.0) < 1e-5
    # Faces come by descending score, as the reference lists them.
    assert [f.prob for f in faces] == sorted((f.prob for f in faces), reverse=True)


def enrol(faces: dict[str, list[Face]]) -> dict[str, list[Any]]:
    gallery: dict[str, list[Any]] = {}
    for key, found in faces.items():
        if "/gallery/" in key:
            (face,) = found
            gallery.setdefault(key.split("/")[2], []).append(face.vec)
    return gallery


async def test_every_probe_matches_each_identity_as_the_reference_does(
    real_models: Path, photos: Path, reference: dict[str, Any]
) -> None:
    keys = sorted(reference["images"])
    faces = await analyze_all(real_models, photos, keys)
    gallery = enrol(faces)
    assert sorted(gallery) == ["alex_lacamoire", "biden", "obama"]
    checked = 0
    for key, expected_faces in reference["identities"].items():
        found = faces[key]
        order = match([f.bbox for f in found], [e["bbox"] for e in expected_faces])
        for e, i in zip(expected_faces, order, strict=True):
            got = best_similarity(found[i].vec, gallery)
            for identity, similarity in e["best_similarity_per_identity"].items():
                assert got[identity] == pytest.approx(similarity, abs=SIMILARITY_TOL), (
                    key,
                    identity,
                )
                checked += 1
    assert checked == 8 * 3  # eight probe faces, three identities


@pytest.mark.parametrize("rec_batch_size", [1, 4, 64])
async def test_the_fixed_batch_recognizer_works_at_any_configured_batch(
    real_models: Path, photos: Path, reference: dict[str, Any], rec_batch_size: int
) -> None:
    settings = real_settings(real_models, rec_batch_size=rec_batch_size)
    async with real_analyzer(settings) as (analyzer, loaded):
        plan = loaded.recognizer.backend.batch_plan
        assert (plan.configured, plan.model_batch, plan.effective) == (rec_batch_size, 1, 1)
        assert plan.mode == ("fixed" if rec_batch_size == 1 else "pieces")
        assert loaded.recognizer.describe()["embedding_size"] == 128
        img = decode(photos / "t1.jpg")
        # Two images at once fill the recognizer's batches with 12 crops.
        first, second = await asyncio.gather(
            analyzer.analyze(img, REFERENCE_OPTIONS), analyzer.analyze(img, REFERENCE_OPTIONS)
        )
    async with real_analyzer(real_settings(real_models, rec_batch_size=1)) as (single, _):
        alone = await single.analyze(img, REFERENCE_OPTIONS)
    assert len(first.faces) == len(second.faces) == len(alone.faces) == 6
    for a, b, c in zip(first.faces, second.faces, alone.faces, strict=True):
        assert a.vec is not None and b.vec is not None and c.vec is not None
        np.testing.assert_allclose(a.vec, c.vec, atol=1e-5)
        np.testing.assert_allclose(b.vec, c.vec, atol=1e-5)


def iou_plus_one(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Overlap with InsightFace's +1 pixel convention (the one NMS uses)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = w * h

    def area(r: tuple[float, ...]) -> float:
        return (r[2] - r[0] + 1) * (r[3] - r[1] + 1)

    return inter / (area(a) + area(b) - inter)


def reference_nms(candidates: list[Face], threshold: float) -> list[Face]:
    """InsightFace's greedy NMS written plainly: by descending score, drop every box whose
    overlap (+1 pixel convention) with a kept one exceeds the threshold."""
    kept: list[Face] = []
    for face in sorted(candidates, key=lambda f: -f.prob):
        if all(iou_plus_one(face.bbox, k.bbox) <= threshold for k in kept):
            kept.append(face)
    return kept


async def test_nms_threshold_changes_results_as_the_reference_does(
    real_models: Path, photos: Path, reference: dict[str, Any]
) -> None:
    key = "photos/t1.jpg"
    options = AnalyzeOptions(threshold=0.3, extract_embedding=False)
    img = decode(photos / "t1.jpg")

    async def detect(nms_threshold: float) -> list[Face]:
        settings = real_settings(real_models, nms_threshold=nms_threshold)
        async with real_analyzer(settings) as (analyzer, _):
            return (await analyzer.analyze(img, options)).faces

    # An overlap never exceeds 1: at 1.0 nothing is suppressed, so these are the candidates.
    candidates = await detect(1.0)
    counts = {}
    for threshold in (0.4, 0.9, 0.95):
        faces = await detect(threshold)
        expected = reference_nms(candidates, threshold)
        assert [f.bbox for f in faces] == [f.bbox for f in expected]
        counts[threshold] = len(faces)
    assert counts[0.4] == len(reference["images"][key]["faces"]) == 6
    assert counts[0.4] < counts[0.9] < counts[0.95] < len(candidates)


def test_nms_keeps_tied_scores_in_input_order_by_descending_score() -> None:
    boxes = np.array(
        [[0, 0, 10, 10], [100, 100, 110, 110], [200, 0, 210, 10], [0, 0, 10, 10.5]],
        np.float32,
    )
    scores = np.array([0.8, 0.9, 0.8, 0.8], np.float32)
    # Stable by descending score: 1 first, then the tied 0, 2, 3 in input order; 3 overlaps
    # 0 and goes. The reversed unstable sort would keep 3 and drop 0.
    assert nms(boxes, scores, 0.4) == [1, 0, 2]


def mosaic(photos: Path, reference: dict[str, Any], columns: int, rows: int) -> np.ndarray:
    """A crowd: t1.jpg's six faces (with some context) tiled into a columns x rows grid."""
    img = cv2.imread(str(photos / "t1.jpg"))
    tiles = []
    for face in reference["images"]["photos/t1.jpg"]["faces"]:
        x1, y1, x2, y2 = face["bbox"]
        pad_x, pad_y = (x2 - x1) * 0.3, (y2 - y1) * 0.3
        crop = img[int(y1 - pad_y) : int(y2 + pad_y), int(x1 - pad_x) : int(x2 + pad_x)]
        tiles.append(cv2.resize(crop, (128, 160)))
    grid = [
        np.hstack([tiles[(r * columns + c) % len(tiles)] for c in range(columns)])
        for r in range(rows)
    ]
    return np.vstack(grid)


async def test_a_crowd_of_more_faces_than_the_queue_holds_is_analysed(
    real_models: Path, photos: Path, reference: dict[str, Any]
) -> None:
    crowd = mosaic(photos, reference, columns=12, rows=6)  # 72 faces, 1536x960
    settings = real_settings(real_models, max_size=(1536, 960), rec_batch_size=4, max_queue=64)
    async with real_analyzer(settings) as (analyzer, _):
        result = await analyzer.analyze(crowd, REFERENCE_OPTIONS)
    assert len(result.faces) > 64
    assert all(f.vec is not None and f.vec.shape == (128,) for f in result.faces)


async def test_a_wrong_colour_order_fact_would_be_caught(
    real_models: Path, photos: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    # The proof that the golden tests see pre-processing: feed the recognizer BGR (an
    # override of its registry fact) and the probe no longer matches the reference.
    override = tmp_path / "models.override.json"
    override.write_text('{"mobilefacenet_128": {"rgb": false}}')
    probe_key = "photos/probe/obama1.jpg"
    keys = ["photos/gallery/obama/obama.jpg", "photos/gallery/obama/obama2.jpg", probe_key]
    faces = await analyze_all(real_models, photos, keys, models_override=override)
    gallery = enrol({k: faces[k] for k in keys[:2]})
    (probe,) = faces[probe_key]
    similarity = best_similarity(probe.vec, gallery)["obama"]
    (expected,) = reference["identities"][probe_key]
    assert abs(similarity - expected["best_similarity_per_identity"]["obama"]) > SIMILARITY_TOL


async def test_a_smaller_max_size_still_finds_the_reference_faces(
    real_models: Path, photos: Path, reference: dict[str, Any]
) -> None:
    # Detecting at 320x320 inside the 640x640 input: the letterbox into the top-left corner
    # must keep coordinates in original pixels; coarser, so within a few pixels only.
    key = "photos/t1.jpg"
    img = decode(photos / "t1.jpg")
    async with real_analyzer(real_settings(real_models)) as (analyzer, _):
        small = await analyzer.analyze(
            img, AnalyzeOptions(threshold=0.3, max_size=(320, 320), extract_embedding=False)
        )
    expected = reference["images"][key]["faces"]
    assert len(small.faces) == len(expected)
    order = match([f.bbox for f in small.faces], [e["bbox"] for e in expected])
    for e, i in zip(expected, order, strict=True):
        assert max_abs_diff(small.faces[i].bbox, e["bbox"]) < 12
