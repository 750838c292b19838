"""`create_app(settings)`: the aiohttp application with every long-lived resource.

Each resource is created and torn down in one cleanup-context generator and stored under a
typed AppKey. Models are loaded at start-up, so a missing or corrupt model fails the start,
never a user's first request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from appliance.api import live_view, middleware, openapi, rest, service_routes, state
from appliance.api.errors import StartupError
from appliance.api.gallery_routes import setup_gallery
from appliance.api.metrics import Metrics
from appliance.api.policy import PolicyBoard
from appliance.api.urls import make_session
from appliance.api.watchdog_wiring import watchdog_ctx
from appliance.config import Settings
from appliance.models.loader import ModelLoadError, build_analyzer, load_models
from appliance.pipeline.images import ImageDecoder

log = structlog.get_logger("appliance.app")


async def models_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[state.SETTINGS]
    metrics = app[state.METRICS]
    try:
        loaded = await asyncio.to_thread(load_models, settings)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    det, rec = loaded.detector, loaded.recognizer
    try:
        serving = build_analyzer(loaded, settings, metrics)
        # Threads last: nothing above can then leave a worker running when it fails.
        serving.start()
    except BaseException:
        # Anything failing after the backends opened must not leave them (and their device
        # memory) open: aiohttp runs a context's cleanup only once it has yielded.
        loaded.close()
        raise
    app[state.EXECUTOR] = serving.executor
    app[state.ANALYZER] = serving.analyzer
    metrics.queue_depth.labels("detector").set_function(lambda: serving.detector.depth)
    metrics.queue_depth.labels("recognizer").set_function(lambda: serving.recognizer.depth)
    metrics.analyses.set_function(lambda: serving.analyzer.demand.active)
    gate = det.backend.gate
    if gate is not None:
        metrics.cores_in_use.set_function(lambda: gate.cores - gate.free)
    models = app[state.MODELS]
    models.backend = loaded.backend
    models.backend_reason = loaded.backend_reason
    models.detector = det.describe()
    models.recognizer = rec.describe()
    models.loaded = True
    log.info(
        "models_loaded",
        backend=loaded.backend,
        detector=det.info.name,
        recognizer=rec.info.name,
        det_batch=det.backend.max_batch,
        det_effective_batch=det.backend.batch_plan.effective,
        rec_batch=rec.backend.max_batch,
        rec_effective_batch=rec.backend.batch_plan.effective,
        embedding_size=rec.embedding_size(),
        executor_threads=loaded.threads.executor_threads,
    )
    yield
    models.loaded = False
    await serving.stop()
    loaded.close()


async def url_session_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[state.SETTINGS]
    session = make_session(settings.url_allowlist, settings.url_timeout_s)
    app[state.URL_SESSION] = session
    yield
    await session.close()


async def mark_stopping(app: web.Application) -> None:
    app[state.STOPPING].set()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=middleware.MIDDLEWARES
    )
    app[state.SETTINGS] = settings
    app[state.METRICS] = Metrics()
    app[state.DECODER] = ImageDecoder.create(
        settings.max_image_pixels,
        max_pixels_in_flight=settings.max_pixels_in_flight,
        use_nvjpeg=settings.use_nvjpeg,
    )
    log.info(
        "jpeg_decoder_chosen",
        library=app[state.DECODER].jpeg_library,
        nvjpeg=app[state.DECODER].nvjpeg_status,
    )
    budget = app[state.DECODER].budget
    app[state.METRICS].pixels_in_flight.set_function(lambda: budget.in_use)
    app[state.METRICS].pixels_capacity.set(budget.capacity)
    app[state.MODELS] = state.ModelsState(backend="none", detector={}, recognizer={})
    app[state.INFO_PROVIDERS] = {}
    app[state.READINESS_CHECKS] = {}
    app[state.POLICY] = PolicyBoard()
    app[state.STOPPING] = asyncio.Event()
    app.on_shutdown.append(mark_stopping)  # first: before the streams say goodbye
    app.cleanup_ctx.extend([models_ctx, watchdog_ctx, url_session_ctx])
    app.add_routes(rest.routes)
    app.add_routes(service_routes.routes)
    openapi.setup_docs(app)
    live_view.setup_streams(app)
    setup_gallery(app)  # after the models: the gallery is bound to the recognizer
    return app
