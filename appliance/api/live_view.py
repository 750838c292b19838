"""The live-view routes: `GET /ws/stream` (admission, one `Stream` per socket), the page at
`/` and its static files; and the streams' part of the app's start-up and shutdown."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import structlog
from aiohttp import WSCloseCode, web

from appliance.api import state
from appliance.api.identify import live_factory
from appliance.api.identify_stream import IdentifyingStream
from appliance.api.metrics import StreamMetrics
from appliance.api.stream_frames import FrameSlots
from appliance.api.stream_session import (
    CLOSE_SHUTDOWN,
    CLOSE_TRY_AGAIN,
    StreamDeps,
    StreamRegistry,
)

log = structlog.get_logger("appliance.stream")

STATIC_DIR = Path(__file__).parent / "static"


async def stream_handler(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    settings = app[state.SETTINGS]
    registry = app[state.STREAMS]
    metrics = app[state.STREAM_METRICS]
    ws = web.WebSocketResponse(
        heartbeat=settings.stream_heartbeat_s, max_msg_size=settings.max_frame_bytes
    )
    await ws.prepare(request)
    refusal = admission_refusal(app)
    if refusal is not None:
        log.info("stream_refused", reason=refusal)
        metrics.closed.labels(str(int(CLOSE_TRY_AGAIN))).inc()
        await ws.close(code=CLOSE_TRY_AGAIN, message=refusal.encode()[:123])
        return ws
    stream_id = f"s{next(registry.ids)}"
    deps = StreamDeps(
        settings,
        metrics,
        app[state.DECODER],
        app[state.EXECUTOR],
        app[state.ANALYZER],
        registry.slots,
    )
    live = functools.partial(live_factory, app[state.GALLERY], app[state.ANALYZER], settings)
    stream = IdentifyingStream(deps, ws, stream_id, app[state.POLICY].current, live)
    registry.streams[stream_id] = stream
    metrics.active.inc()
    structlog.contextvars.bind_contextvars(stream_id=stream_id)
    log.info("stream_opened", remote=request.remote, active=len(registry.streams))
    try:
        await stream.run()
    finally:
        # Bookkeeping first and without awaiting: a handler cancelled because the peer
        # vanished must still leave the registry, the gauge and the log right.
        registry.streams.pop(stream_id, None)
        metrics.active.dec()
        for task in stream.tasks:
            task.cancel()
        # Our own code when we closed; otherwise the peer's.
        code = stream.close_code or ws.close_code or WSCloseCode.ABNORMAL_CLOSURE
        metrics.closed.labels(str(int(code))).inc()
        c = stream.counters
        log.info(
            "stream_closed",
            code=int(code),
            received=c.received,
            processed=c.processed,
            dropped=c.dropped,
            bad_frames=c.bad,
            results_dropped=c.results_dropped,
        )
        structlog.contextvars.unbind_contextvars("stream_id")
        await stream.stop()
    return ws


def admission_refusal(app: web.Application) -> str | None:
    """Why a new stream must be refused now (closed with 1013), or None."""
    settings = app[state.SETTINGS]
    registry = app[state.STREAMS]
    policy = app[state.POLICY].current
    if registry.shutting_down:
        return "the appliance is shutting down"
    if policy.inference_paused or not policy.accept_new_streams:
        return f"not accepting new streams: device is {policy.state}"
    if len(registry.streams) >= settings.max_streams:
        return f"too many streams: MAX_STREAMS is {settings.max_streams}"
    return None


async def close_streams_on_shutdown(app: web.Application) -> None:
    """on_shutdown runs before the cleanup contexts stop the batchers: say goodbye first."""
    registry = app[state.STREAMS]
    registry.shutting_down = True
    streams = list(registry.streams.values())
    for stream in streams:
        stream.request_close(CLOSE_SHUTDOWN, "server shutdown")
    await asyncio.gather(
        *(s.closer for s in streams if s.closer is not None), return_exceptions=True
    )


async def policy_subscription_ctx(app: web.Application) -> AsyncIterator[None]:
    unsubscribe: Callable[[], None] = app[state.POLICY].subscribe(app[state.STREAMS].on_policy)
    yield
    unsubscribe()


async def frame_slots_ctx(app: web.Application) -> AsyncIterator[None]:
    """Size the streams' shared frame slots from the detector (after the models' context)."""
    batcher = app[state.ANALYZER].detector.batcher
    configured = app[state.SETTINGS].stream_frame_slots
    slots = (
        FrameSlots(configured)
        if configured
        else FrameSlots.for_detector(batcher.workers, batcher.max_batch)
    )
    app[state.STREAMS].slots = slots
    app[state.STREAM_METRICS].in_analysis.set_function(lambda: slots.in_use)
    app[state.STREAM_METRICS].slots.set(slots.size)
    yield


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


def setup_streams(app: web.Application) -> None:
    """Register /ws/stream, the live view page and the stream state of this app."""
    registry = StreamRegistry()
    app[state.STREAMS] = registry
    app[state.STREAM_METRICS] = StreamMetrics(app[state.METRICS])
    app[state.INFO_PROVIDERS]["streams"] = lambda: {
        "active": len(registry.streams),
        "max_streams": app[state.SETTINGS].max_streams,
        "stream_max_fps": app[state.SETTINGS].stream_max_fps,
    }
    app.cleanup_ctx.extend([policy_subscription_ctx, frame_slots_ctx])
    app.on_shutdown.append(close_streams_on_shutdown)
    app.router.add_get("/ws/stream", stream_handler, name="ws_stream")
    app.router.add_get("/", index, name="live_view")
    app.router.add_static("/static/", STATIC_DIR, name="static")
