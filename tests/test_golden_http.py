"""Golden tests end to end: the real models behind the real server on a real socket.

`reference.json` was computed by InsightFace's own implementation; InsightFace-REST answers
those boxes and landmarks as `astype(int)` and `size` as the box width. Our default answer
must be those integers (within the one pixel that float differences can move a truncation);
`subpixel` must give the floats themselves. Either way every face lands within one pixel of
the reference.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.golden import (
    HTTP_PIXEL_TOL,
    REFERENCE_DET_THRESHOLD,
    SCORE_TOL,
    SIMILARITY_TOL,
    best_similarity,
    match,
    max_abs_diff,
)
from tests.real_data import REAL_DETECTOR, load_reference, real_settings
from tests.test_golden import mosaic


async def extract(client: Any, images: list[bytes], **options: Any) -> list[dict[str, Any]]:
    body = {
        "images": {"data": [base64.b64encode(i).decode("ascii") for i in images]},
        "threshold": REFERENCE_DET_THRESHOLD,
        "return_landmarks": True,
        **options,
    }
    response = await client.post("/extract", json=body)
    assert response.status == 200, await response.text()
    data: list[dict[str, Any]] = (await response.json())["data"]
    assert all(d["status"] == "ok" for d in data), data
    return data


async def test_every_photo_and_probe_matches_the_reference_through_http(
    serve: Any, real_models: Path, photos: Path
) -> None:
    reference = load_reference(photos)
    keys = sorted(reference["images"])
    # Both models fix their batch at 1: at 4 each runs its batches in pieces.
    client = await serve(**real_settings(real_models, det_batch_size=4, rec_batch_size=4))
    info = await (await client.get("/info")).json()
    assert info["models"]["detector"]["batch_mode"] == "pieces"
    data = await extract(client, [(photos.parent / k).read_bytes() for k in keys])
    faces_by_key = dict(zip(keys, (d["faces"] for d in data), strict=True))
    for key in keys:
        expected = reference["images"][key]["faces"]
        faces = faces_by_key[key]
        assert len(faces) == len(expected), key
        order = match([f["bbox"] for f in faces], [e["bbox"] for e in expected])
        for e, i in zip(expected, order, strict=True):
            assert max_abs_diff(faces[i]["bbox"], e["bbox"]) <= HTTP_PIXEL_TOL, key
            assert max_abs_diff(faces[i]["landmarks"], e["landmarks"]) <= HTTP_PIXEL_TOL, key
            assert abs(faces[i]["prob"] - e["score"]) <= SCORE_TOL, key
            assert len(faces[i]["vec"]) == 128
    gallery: dict[str, list[Any]] = {}
    for key in keys:
        if "/gallery/" in key:
            (face,) = faces_by_key[key]
            gallery.setdefault(key.split("/")[2], []).append(face["vec"])
    for key, expected_faces in reference["identities"].items():
        faces = faces_by_key[key]
        order = match([f["bbox"] for f in faces], [e["bbox"] for e in expected_faces])
        for e, i in zip(expected_faces, order, strict=True):
            got = best_similarity(faces[i]["vec"], gallery)
            for identity, similarity in e["best_similarity_per_identity"].items():
                assert got[identity] == pytest.approx(similarity, abs=SIMILARITY_TOL)


async def test_default_answer_is_insightface_rest_integers_and_subpixel_the_floats(
    serve: Any, real_models: Path, photos: Path
) -> None:
    client = await serve(**real_settings(real_models, rec_batch_size=1))
    image = (photos / "t1.jpg").read_bytes()
    (ints,) = await extract(client, [image])
    (floats,) = await extract(client, [image], subpixel=True)
    reference = load_reference(photos)["images"]["photos/t1.jpg"]["faces"]
    assert len(ints["faces"]) == len(floats["faces"]) == len(reference)
    order = match([f["bbox"] for f in floats["faces"]], [e["bbox"] for e in reference])
    for e, i in zip(reference, order, strict=True):
        face = floats["faces"][i]
        assert max_abs_diff(face["bbox"], e["bbox"]) < HTTP_PIXEL_TOL
        assert max_abs_diff(face["landmarks"], e["landmarks"]) < HTTP_PIXEL_TOL
        assert abs(face["prob"] - e["score"]) < 0.01
    order = match([f["bbox"] for f in ints["faces"]], [e["bbox"] for e in reference])
    for e, i in zip(reference, order, strict=True):
        face = ints["faces"][i]
        assert all(type(v) is int for v in face["bbox"])
        assert max_abs_diff(face["bbox"], [math.trunc(v) for v in e["bbox"]]) <= 1
        assert face["size"] == pytest.approx(math.trunc(e["bbox"][2] - e["bbox"][0]), abs=1)
        assert max_abs_diff(face["landmarks"], np.trunc(e["landmarks"])) <= 1
        assert float(np.linalg.norm(face["vec"])) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("rec_batch_size", [1, 4, 64])
async def test_info_reports_configured_and_effective_batch_and_embedding_size(
    serve: Any, real_models: Path, photos: Path, rec_batch_size: int
) -> None:
    client = await serve(**real_settings(real_models, rec_batch_size=rec_batch_size))
    info = await (await client.get("/info")).json()
    rec = info["models"]["recognizer"]
    assert rec["embedding_size"] == 128
    assert (rec["configured_batch"], rec["effective_batch"], rec["model_batch"]) == (
        rec_batch_size,
        1,
        1,
    )
    assert rec["batch_mode"] == ("fixed" if rec_batch_size == 1 else "pieces")
    det = info["models"]["detector"]
    assert (det["name"], det["normalizes_input"], det["rgb"]) == (REAL_DETECTOR, False, True)
    # The request that answered 500 before: six faces of t1.jpg at once.
    (result,) = await extract(client, [(photos / "t1.jpg").read_bytes()])
    assert len(result["faces"]) == 6
    assert all(len(f["vec"]) == 128 for f in result["faces"])


async def test_a_crowd_photo_is_answered_on_an_idle_server(
    serve: Any, real_models: Path, photos: Path
) -> None:
    reference = load_reference(photos)
    crowd = mosaic(photos, reference, columns=12, rows=6)
    ok, jpeg = cv2.imencode(".jpg", crowd, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    client = await serve(**real_settings(real_models, max_size=(1536, 960), max_queue=64))
    (result,) = await extract(client, [bytes(jpeg.tobytes())])
    assert len(result["faces"]) > 64
    vecs = np.array([f["vec"] for f in result["faces"]])
    assert vecs.shape[1] == 128


async def test_nms_threshold_setting_reaches_the_detector(
    serve: Any, real_models: Path, photos: Path
) -> None:
    image = (photos / "t1.jpg").read_bytes()
    strict = await serve(**real_settings(real_models))
    (default,) = await extract(strict, [image], threshold=0.3, extract_embedding=False)
    lax = await serve(**real_settings(real_models, nms_threshold=0.95))
    (loose,) = await extract(lax, [image], threshold=0.3, extract_embedding=False)
    # The same candidates; 0.95 suppresses only near-identical boxes (see test_golden).
    assert len(default["faces"]) == 6
    assert len(loose["faces"]) > len(default["faces"])
