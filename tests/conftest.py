"""Shared fixtures: generated SCRFD/ArcFace test models and a real server on a real socket."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from appliance.api.app import create_app
from appliance.config import Settings, load_settings
from appliance.models.demo import PlantedFace, build_arcface_model, build_scrfd_model
from tests.helpers import write_calm_sysfs
from tests.real_data import photos, real_models

__all__ = ["photos", "real_models"]  # fixtures on the shared real models and photos

# Faces the test detector reports, in 640x640 detector-input pixels. Sizes land on each of
# the three strides (8: < 64 px, 16: < 160 px, 32: larger).
PLANTED = (
    PlantedFace.square(100, 120, 80, score=0.95),
    PlantedFace.square(360, 200, 40, score=0.72),
    PlantedFace.square(300, 380, 200, score=0.88),
)
DET_MODEL = "test_scrfd"
REC_MODEL = "test_arcface"


def write_models(
    directory: Path, faces: tuple[PlantedFace, ...] = PLANTED, **det_kwargs: Any
) -> Path:
    build_scrfd_model(directory / "det.onnx", faces, **det_kwargs)
    build_arcface_model(directory / "rec.onnx")
    override = {
        DET_MODEL: {"family": "scrfd", "file": "det.onnx"},
        REC_MODEL: {"family": "arcface", "file": "rec.onnx"},
    }
    (directory / "models.override.json").write_text(json.dumps(override))
    return directory


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def calm_sysfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_calm_sysfs(tmp_path_factory.mktemp("sysfs"))


@pytest.fixture
def make_settings(models_dir: Path, calm_sysfs: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "models_dir": models_dir,
            "det_model": DET_MODEL,
            "rec_model": REC_MODEL,
            "trust_unverified": True,
            "det_batch_size": 4,
            "rec_batch_size": 8,
            "log_format": "json",
            # Never the CI host's real /sys and /proc/meminfo (issue 12 defect 8).
            "telemetry_source": "sysfs",
            "sysfs_root": calm_sysfs,
            # Never the host's /var/lib/appliance: each test gets its own gallery.
            "gallery_db": tmp_path / "gallery.db",
        }
        values.update(overrides)
        return load_settings(env={}, **values)

    return make


@pytest.fixture
def serve(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> Callable[..., Any]:
    """Start the real app on 127.0.0.1 with these setting overrides; returns a TestClient."""

    async def start(**overrides: Any) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(make_settings(**overrides))
        )
        return client

    return start
