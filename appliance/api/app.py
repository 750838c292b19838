"""`create_app(settings)`: the aiohttp application with every long-lived resource.

Each resource is created and torn down in one cleanup-context generator and stored under a
typed AppKey. Models are loaded at start-up, so a missing or corrupt model fails the start,
never a user's first request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from appliance.api import middleware, openapi, rest, state, stream
from appliance.api.errors import StartupError
from appliance.api.metrics import Metrics
from appliance.api.policy import PolicyBoard
from appliance.api.urls import make_session
from appliance.api.watchdog_wiring import watchdog_ctx
from appliance.backends.base import BackendError, InferenceBackend
from appliance.backends.factory import ResolvedBackend, choose_backend, open_backend
from appliance.config import Settings
from appliance.models import onnx_graph
from appliance.models.registry import DEMO_DETECTOR, DEMO_RECOGNIZER, ModelInfo, ModelRegistry
from appliance.pipeline.batcher import DynamicBatcher
from appliance.pipeline.faces import FaceAnalyzer, ModelSlot
from appliance.pipeline.images import ImageDecoder

log = structlog.get_logger("appliance.app")


@dataclasses.dataclass
class LoadedModel:
    info: ModelInfo
    path: Path
    backend: InferenceBackend
    normalizes_input: bool
    sha256: str


def model_names(settings: Settings) -> tuple[str, str]:
    if settings.demo_models:
        return DEMO_DETECTOR, DEMO_RECOGNIZER
    return settings.det_model, settings.rec_model


def locate_model(
    settings: Settings, registry: ModelRegistry, name: str
) -> tuple[ModelInfo, Path, str]:
    """The model's verified file and its sha256; raises StartupError with the fix when it is
    missing or bad. The verification already hashes the file: its sha256 is reused for /info."""
    info = registry.get(name)
    if settings.demo_models:
        path = settings.models_dir / info.file
        return info, path, onnx_graph.sha256_file(path)
    from appliance.models.store import ModelStore, ModelStoreError

    store = ModelStore(settings.models_dir, registry, trust_unverified=settings.trust_unverified)
    try:
        result = store.require_verified(name)
    except ModelStoreError as exc:
        raise StartupError(str(exc)) from None
    assert result.sha256 is not None  # computed for every present file
    return info, result.path, result.sha256


def load_model(
    kind: ResolvedBackend,
    settings: Settings,
    info: ModelInfo,
    path: Path,
    sha256: str,
    max_batch: int,
) -> LoadedModel:
    normalizes = info.normalized_in_graph
    if normalizes is None:
        # Only read the graph when the registry does not already know the answer: a large
        # recognizer takes seconds to parse on the Orin's CPU.
        normalizes = onnx_graph.normalizes_input(onnx_graph.load(path))
    backend = open_backend(kind, settings, info, path, max_batch)
    return LoadedModel(info, path, backend, normalizes, sha256)


def detector_input_size(settings: Settings, backend: InferenceBackend) -> tuple[int, int]:
    shape = backend.inputs[0].shape
    height, width = shape[2], shape[3]
    if height > 0 and width > 0 and (width, height) != settings.max_size:
        raise StartupError(
            f"MAX_SIZE is {settings.max_size[0]},{settings.max_size[1]} but the detector "
            f"{backend.name} has a fixed {width}x{height} input; set MAX_SIZE={width},{height}"
        )
    return settings.max_size


def _describe(model: LoadedModel, input_size: tuple[int, int], max_batch: int) -> dict[str, Any]:
    return {
        "name": model.info.name,
        "family": model.info.family,
        "file": str(model.path),
        "sha256": model.sha256,
        "checksum": model.info.checksum,
        "input_size": list(input_size),
        "max_batch": max_batch,
        "normalizes_input": model.normalizes_input,
    }


async def executor_ctx(app: web.Application) -> AsyncIterator[None]:
    executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="cpu")
    app[state.EXECUTOR] = executor
    yield
    executor.shutdown(wait=True, cancel_futures=True)


async def models_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[state.SETTINGS]
    metrics = app[state.METRICS]
    det_name, rec_name = model_names(settings)

    def load_all() -> tuple[str, str, LoadedModel, LoadedModel]:
        if settings.demo_models:
            from appliance.models.demo import build_demo_models

            build_demo_models(settings.models_dir, settings.max_size)
        registry = ModelRegistry.load(settings.override_file)
        det_info, det_path, det_sha = locate_model(settings, registry, det_name)
        rec_info, rec_path, rec_sha = locate_model(settings, registry, rec_name)
        if det_info.family != "scrfd" or rec_info.family != "arcface":
            raise StartupError(
                f"DET_MODEL must be an scrfd model and REC_MODEL an arcface model; got "
                f"{det_name} ({det_info.family}) and {rec_name} ({rec_info.family})"
            )
        kind, reason = choose_backend(settings)
        log.info("backend_chosen", backend=kind, reason=reason)
        det = load_model(kind, settings, det_info, det_path, det_sha, settings.det_batch_size)
        try:
            rec = load_model(kind, settings, rec_info, rec_path, rec_sha, settings.rec_batch_size)
        except BaseException:
            det.backend.close()
            raise
        return kind, reason, det, rec

    try:
        kind, reason, det, rec = await asyncio.to_thread(load_all)
    except BackendError as exc:
        raise StartupError(str(exc)) from None
    det_size = detector_input_size(settings, det.backend)

    def observer(model: str) -> Callable[[list[str], float], None]:
        return lambda tags, seconds: metrics.observe_batch(model, tags, seconds)

    det_batcher = DynamicBatcher(
        "detector",
        det.backend.infer,
        det.backend.max_batch,
        settings.batch_window_ms,
        settings.max_queue,
        observer("detector"),
    )
    rec_batcher = DynamicBatcher(
        "recognizer",
        rec.backend.infer,
        rec.backend.max_batch,
        settings.batch_window_ms,
        settings.max_queue,
        observer("recognizer"),
    )
    metrics.queue_depth.labels("detector").set_function(lambda: det_batcher.depth)
    metrics.queue_depth.labels("recognizer").set_function(lambda: rec_batcher.depth)
    det_batcher.start()
    rec_batcher.start()
    app[state.ANALYZER] = FaceAnalyzer(
        ModelSlot(det.info, det_batcher, tuple(o.name for o in det.backend.outputs), det_size),
        ModelSlot(
            rec.info,
            rec_batcher,
            tuple(o.name for o in rec.backend.outputs),
            (112, 112),
            rec.normalizes_input,
        ),
        app[state.EXECUTOR],
    )
    models = app[state.MODELS]
    models.backend = kind
    models.backend_reason = reason
    models.detector = _describe(det, det_size, det.backend.max_batch)
    models.recognizer = _describe(rec, (112, 112), rec.backend.max_batch)
    models.loaded = True
    log.info(
        "models_loaded",
        backend=kind,
        detector=det.info.name,
        recognizer=rec.info.name,
        det_batch=det.backend.max_batch,
        rec_batch=rec.backend.max_batch,
    )
    yield
    models.loaded = False
    await det_batcher.stop()
    await rec_batcher.stop()
    det.backend.close()
    rec.backend.close()


async def url_session_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[state.SETTINGS]
    session = make_session(settings.url_allowlist, settings.url_timeout_s)
    app[state.URL_SESSION] = session
    yield
    await session.close()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=middleware.MIDDLEWARES
    )
    app[state.SETTINGS] = settings
    app[state.METRICS] = Metrics()
    app[state.DECODER] = ImageDecoder.create(
        settings.max_image_pixels, max_pixels_in_flight=settings.max_pixels_in_flight
    )
    app[state.MODELS] = state.ModelsState(backend="none", detector={}, recognizer={})
    app[state.INFO_PROVIDERS] = {}
    app[state.READINESS_CHECKS] = {}
    app[state.POLICY] = PolicyBoard()
    app.cleanup_ctx.extend([executor_ctx, models_ctx, watchdog_ctx, url_session_ctx])
    app.add_routes(rest.routes)
    app.add_routes(openapi.routes)
    stream.setup_streams(app)
    return app
