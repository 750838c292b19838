"""The shared real models and photos (`../shared` beside the checkout; see its DATA.md).

Tests that need them take the `real_models` or `photos` fixture and skip, saying why, where
the directory is absent. Nothing here is copied into the repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_MODELS = SHARED / "models"
PHOTOS = SHARED / "photos"
REAL_DETECTOR = "scrfd_2.5g_bnkps"
REAL_RECOGNIZER = "mobilefacenet_128"


def _require(path: Path, what: str) -> Path:
    if not path.is_dir():
        pytest.skip(f"{what} not found at {path} (the shared test data sits beside the checkout)")
    return path


@pytest.fixture(scope="session")
def real_models() -> Path:
    path = _require(REAL_MODELS, "real models (../shared/models)")
    for name in (REAL_DETECTOR, REAL_RECOGNIZER):
        if not (path / f"{name}.onnx").is_file():
            pytest.skip(f"{path / name}.onnx is missing")
    return path


@pytest.fixture(scope="session")
def photos() -> Path:
    return _require(PHOTOS, "real photos (../shared/photos)")


def load_reference(photos: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((photos / "reference.json").read_text())
    return data


def real_settings(models_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Server settings that run the shared real models, checksums enforced."""
    return {
        "models_dir": models_dir,
        "det_model": REAL_DETECTOR,
        "rec_model": REAL_RECOGNIZER,
        "trust_unverified": False,
        "det_batch_size": 1,
        **overrides,
    }
