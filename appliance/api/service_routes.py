"""Service routes for operators and probes: /info, /health/live, /health/ready, /metrics."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from appliance import __version__
from appliance.api import state
from appliance.api.face_wire import DEMO_WARNING
from appliance.api.responses import respond
from appliance.api.wire import (
    InfoResponse,
    Liveness,
    ModelsInfo,
    NvJpegInfo,
    Readiness,
    encode_json,
)

routes = web.RouteTableDef()


@routes.get("/info")
async def info(request: web.Request) -> web.Response:
    app = request.app
    models = app[state.MODELS]
    decoder = app[state.DECODER]
    payload = InfoResponse(
        version=__version__,
        backend=models.backend,
        backend_reason=models.backend_reason,
        models=ModelsInfo(detector=models.detector, recognizer=models.recognizer),
        jpeg_decoder=decoder.jpeg_library,
        nvjpeg=NvJpegInfo(
            requested=app[state.SETTINGS].use_nvjpeg,
            in_use=decoder.gpu is not None,
            status=decoder.nvjpeg_status,
        ),
        settings=app[state.SETTINGS].public_dict(),
        demo=models.demo,
    )
    # Sections other parts of the app own (streams, watchdog) sit beside the typed ones.
    body: dict[str, Any] = msgspec.to_builtins(payload)
    for name, provider in app[state.INFO_PROVIDERS].items():
        body[name] = provider()
    return web.Response(body=encode_json(body), content_type="application/json")


@routes.get("/health/live")
async def health_live(request: web.Request) -> web.Response:
    return await respond(request, Liveness(), use_msgpack=False)


@routes.get("/health/ready")
async def health_ready(request: web.Request) -> web.Response:
    app = request.app
    models = app[state.MODELS]
    checks: dict[str, dict[str, Any]] = {"models": {"ok": models.loaded, "backend": models.backend}}
    for name, check in app[state.READINESS_CHECKS].items():
        checks[name] = check()
    ready = all(bool(c.get("ok")) for c in checks.values())
    payload = Readiness(status="ready" if ready else "not_ready", checks=checks)
    if models.demo:
        payload.demo = True
        payload.warnings = [DEMO_WARNING]
    return await respond(request, payload, use_msgpack=False, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[state.METRICS].render(), content_type="text/plain", charset="utf-8"
    )
