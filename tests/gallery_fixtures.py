"""Real models and photos of ../shared for the gallery and tracking tests (DATA.md).

The shared models are registered through an override file (family + file), as an operator
would; the real MobileFaceNet has a fixed batch of 1, so both batch sizes are 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from appliance.commands.local_pipeline import open_pipeline
from appliance.config import Settings, load_settings
from appliance.gallery.records import Recognizer
from appliance.pipeline.faces import AnalyzeOptions

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
PHOTOS = SHARED / "photos"
DET = "shared_scrfd_2.5g"
REC = "mobilefacenet_128"
# The reference's detector settings (reference.json "method").
DET_THRESHOLD = 0.5

needs_shared = pytest.mark.skipif(
    not (MODELS / "mobilefacenet_128.onnx").exists() or not PHOTOS.is_dir(),
    reason=f"real models and photos are not at {SHARED} (see DATA.md)",
)


def real_settings(tmp: Path, **overrides: Any) -> Settings:
    override = tmp / "models.override.json"
    override.write_text(
        json.dumps(
            {
                DET: {"family": "scrfd", "file": "scrfd_2.5g_bnkps.onnx"},
                REC: {"family": "arcface", "file": "mobilefacenet_128.onnx"},
            }
        )
    )
    values: dict[str, Any] = {
        "models_dir": MODELS,
        "models_override": override,
        "det_model": DET,
        "rec_model": REC,
        "trust_unverified": True,
        "det_batch_size": 1,
        "rec_batch_size": 1,
        "inference_backend": "onnx",
        "det_threshold": DET_THRESHOLD,
        "gallery_db": tmp / "gallery.db",
        "log_format": "json",
    }
    values.update(overrides)
    return load_settings(env={}, **values)


@dataclasses.dataclass(frozen=True)
class PhotoFace:
    bbox: tuple[float, float, float, float]
    vec: np.ndarray[Any, np.dtype[np.float32]]


@dataclasses.dataclass(frozen=True)
class RealFaces:
    recognizer: Recognizer
    dim: int
    # Path relative to PHOTOS ("gallery/obama/obama.jpg") -> faces, detector order.
    faces: dict[str, list[PhotoFace]]

    def gallery(self) -> dict[str, list[np.ndarray[Any, np.dtype[np.float32]]]]:
        """Subject -> the largest face's embedding of each enrolment photo."""
        out: dict[str, list[np.ndarray[Any, np.dtype[np.float32]]]] = {}
        for key, faces in sorted(self.faces.items()):
            if key.startswith("gallery/"):
                best = max(faces, key=lambda f: f.bbox[2] - f.bbox[0])
                out.setdefault(key.split("/")[1], []).append(best.vec)
        return out


async def _analyze_all(settings: Settings) -> RealFaces:
    photos = sorted(
        p for p in PHOTOS.rglob("*") if p.suffix in (".jpg", ".png") and "gallery" in p.parts
    ) + sorted(p for p in (PHOTOS / "probe").iterdir())
    out: dict[str, list[PhotoFace]] = {}
    async with open_pipeline(settings) as pipe:
        for path in photos:
            img = cv2.imread(str(path))
            result = await pipe.analyzer.analyze(img, AnalyzeOptions(threshold=DET_THRESHOLD))
            out[str(path.relative_to(PHOTOS))] = [
                PhotoFace(f.bbox, np.asarray(f.vec, np.float32)) for f in result.faces
            ]
        return RealFaces(pipe.recognizer, pipe.dim, out)


@pytest.fixture(scope="session")
def real_faces(tmp_path_factory: pytest.TempPathFactory) -> RealFaces:
    if not (MODELS / "mobilefacenet_128.onnx").exists():
        pytest.skip(f"real models are not at {MODELS} (see DATA.md)")
    settings = real_settings(tmp_path_factory.mktemp("real"))
    return asyncio.run(_analyze_all(settings))


def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PHOTOS / "reference.json").read_text())
    return data


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
