"""The coordinates convention against the independent reference: real SCRFD-2.5G and
MobileFaceNet from ../shared/models on ../shared/photos/t1.jpg, through the real server.

`reference.json` was computed by InsightFace's own implementation; InsightFace-REST answers
those boxes and landmarks as `astype(int)` and `size` as the box width. Our default answer
must be those integers (within the one pixel that float differences can move a truncation);
`subpixel` must give the floats themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import b64

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
MODELS = SHARED / "models"
PHOTO = SHARED / "photos" / "t1.jpg"

pytestmark = pytest.mark.skipif(
    not (MODELS / "scrfd_2.5g_bnkps.onnx").is_file() or not PHOTO.is_file(),
    reason=f"the shared models and photos are not at {SHARED} (../shared from the repo root)",
)


@pytest.fixture
def real_models(tmp_path: Path) -> Path:
    for name in ("scrfd_2.5g_bnkps.onnx", "mobilefacenet_128.onnx"):
        (tmp_path / name).symlink_to(MODELS / name)
    # Registered under names of their own: the shared copies are checked by the tests that
    # own the registry, here they are just the reference's models.
    override = {
        "ref_scrfd": {"family": "scrfd", "file": "scrfd_2.5g_bnkps.onnx"},
        "ref_mobilefacenet": {"family": "arcface", "file": "mobilefacenet_128.onnx"},
    }
    (tmp_path / "models.override.json").write_text(json.dumps(override))
    return tmp_path


def reference_faces() -> list[dict[str, Any]]:
    data = json.loads((SHARED / "photos" / "reference.json").read_text())
    faces: list[dict[str, Any]] = data["images"]["photos/t1.jpg"]["faces"]
    return faces


def nearest(faces: list[dict[str, Any]], bbox: list[float]) -> dict[str, Any]:
    return min(faces, key=lambda f: float(np.abs(np.array(f["bbox"]) - np.array(bbox)).sum()))


async def test_real_models_answer_the_reference_as_insightface_rest_would(
    serve: Any, real_models: Path
) -> None:
    client = await serve(
        models_dir=real_models,
        det_model="ref_scrfd",
        rec_model="ref_mobilefacenet",
        det_batch_size=1,
        rec_batch_size=1,
    )
    body = {
        "images": {"data": [b64(PHOTO.read_bytes())]},
        "threshold": 0.5,
        "return_landmarks": True,
    }
    ints = (await (await client.post("/extract", json=body)).json())["data"][0]["faces"]
    floats = (await (await client.post("/extract", json={**body, "subpixel": True})).json())[
        "data"
    ][0]["faces"]
    reference = reference_faces()
    assert len(ints) == len(floats) == len(reference)
    for face in floats:
        ref = nearest(reference, face["bbox"])
        assert np.abs(np.array(face["bbox"]) - ref["bbox"]).max() < 1.0
        assert np.abs(np.array(face["landmarks"]) - ref["landmarks"]).max() < 1.0
        assert abs(face["prob"] - ref["score"]) < 0.01
    for face in ints:
        ref = nearest(reference, face["bbox"])
        truncated = [math.trunc(v) for v in ref["bbox"]]
        assert all(type(v) is int for v in face["bbox"])
        assert np.abs(np.array(face["bbox"]) - truncated).max() <= 1
        assert face["size"] == pytest.approx(math.trunc(ref["bbox"][2] - ref["bbox"][0]), abs=1)
        assert np.abs(np.array(face["landmarks"]) - np.trunc(ref["landmarks"])).max() <= 1
        assert len(face["vec"]) == 128
        assert float(np.linalg.norm(face["vec"])) == pytest.approx(1.0, abs=1e-4)
