"""What the golden tests share: a FaceAnalyzer on the real models, matching faces to the
reference, and the reference's similarity measure."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import Settings, load_settings
from appliance.models.loader import LoadedModels, build_analyzer, load_models
from appliance.pipeline.faces import FaceAnalyzer
from appliance.pipeline.images import ImageArray, ImageDecoder
from tests.real_data import REAL_DETECTOR, REAL_RECOGNIZER

# The reference rounds boxes and landmarks to 0.01 px and scores to 1e-5: our floats may
# differ from its printed values by half of that plus JPEG decoders' grey-level differences.
SUBPIXEL_TOL = 0.01
HTTP_PIXEL_TOL = 1.0
SCORE_TOL = 1e-4
SIMILARITY_TOL = 0.01
REFERENCE_DET_THRESHOLD = 0.5


def real_settings(real_models: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "models_dir": real_models,
        "det_model": REAL_DETECTOR,
        "rec_model": REAL_RECOGNIZER,
        "log_format": "json",
    }
    values.update(overrides)
    return load_settings(env={}, **values)


@asynccontextmanager
async def real_analyzer(settings: Settings) -> AsyncIterator[tuple[FaceAnalyzer, LoadedModels]]:
    loaded = load_models(settings)
    serving = build_analyzer(loaded, settings)  # as the server builds it
    serving.start()
    try:
        yield serving.analyzer, loaded
    finally:
        await serving.stop()
        loaded.close()


def decode(path: Path) -> ImageArray:
    return ImageDecoder.create(200_000_000).decode(path.read_bytes())


def match(boxes: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> list[int]:
    """For each reference box, the index of the nearest of `boxes` (by corner distance)."""
    got = np.asarray(boxes, np.float64).reshape(-1, 4)
    found = []
    for ref in reference:
        distance = np.abs(got - np.asarray(ref, np.float64)).max(axis=1)
        found.append(int(distance.argmin()))
    assert len(set(found)) == len(found), "two reference faces matched the same face"
    return found


def max_abs_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def best_similarity(vec: Any, gallery: dict[str, list[Any]]) -> dict[str, float]:
    """Best cosine similarity of one embedding to each identity's enrolled embeddings."""
    v = np.asarray(vec, np.float64)
    v = v / np.linalg.norm(v)
    out = {}
    for identity, vecs in gallery.items():
        g = np.asarray(vecs, np.float64)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        out[identity] = float((g @ v).max())
    return out


def photo_keys(reference: dict[str, Any]) -> list[str]:
    return sorted(reference["images"])
