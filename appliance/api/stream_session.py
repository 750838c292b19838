"""One live stream: a reader, a worker and a writer around one WebSocket (docs/STREAMS.md).

The reader (`run`) puts each frame into the single *waiting* slot, where a newer frame replaces
it (latest-frame-wins); the worker takes it no sooner than the fps cap allows and once one of
the frame slots shared by all streams is free (`stream_frames.FrameSlots`), and runs it
through the shared batchers, so at most one frame per stream is in flight and a constant
number across all streams; the writer drains a bounded outbox, dropping the oldest results of
a client that does not read. The session knows no app: what it needs is handed in
(`StreamDeps`); `api/live_view.py` wires it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Coroutine
from concurrent.futures import Executor
from typing import Any

import structlog
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from appliance.api.admission import decode_admitted
from appliance.api.face_wire import face_out
from appliance.api.metrics import StreamMetrics
from appliance.api.policy import LoadPolicy
from appliance.api.stream_frames import Counters, Frame, FrameSlots, percentile
from appliance.api.stream_protocol import (
    BadConfig,
    BadMessage,
    ConfigAck,
    ErrorMessage,
    Latency,
    ResultMessage,
    ServerMessage,
    StatsMessage,
    StatusMessage,
    StreamConfig,
    decode_client_message,
    encode,
    parse_config,
)
from appliance.config import Settings
from appliance.pipeline.batcher import BatcherClosedError, QueueFullError
from appliance.pipeline.faces import FaceAnalyzer, ImageResult
from appliance.pipeline.images import JPEG_MAGIC, PNG_MAGIC, ImageArray, ImageDecoder, ImageError

log = structlog.get_logger("appliance.stream")

# Recent per-frame latencies kept for the p50/p99 in stats messages.
LATENCY_WINDOW = 512

CLOSE_SHUTDOWN = WSCloseCode.GOING_AWAY  # 1001
CLOSE_POLICY = WSCloseCode.POLICY_VIOLATION  # 1008
CLOSE_TOO_BIG = WSCloseCode.MESSAGE_TOO_BIG  # 1009
CLOSE_TRY_AGAIN = WSCloseCode.TRY_AGAIN_LATER  # 1013
CLOSE_INTERNAL = WSCloseCode.INTERNAL_ERROR  # 1011


@dataclasses.dataclass(frozen=True)
class StreamDeps:
    """What a stream uses of the app; shared by every stream of it."""

    settings: Settings
    metrics: StreamMetrics
    decoder: ImageDecoder
    executor: Executor
    analyzer: FaceAnalyzer
    # Shared by all streams; None only before start-up sizes them (`live_view`): no limit.
    slots: FrameSlots | None = None


class StreamRegistry:
    """The open streams of one app; the policy board's subscriber for all of them."""

    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self.ids = itertools.count(1)
        self.shutting_down = False
        # Set at start-up, once the detector's workers and batch are known (live_view).
        self.slots: FrameSlots | None = None

    def on_policy(self, policy: LoadPolicy) -> None:
        for stream in list(self.streams.values()):
            stream.apply_policy(policy)


class Stream:
    def __init__(
        self, deps: StreamDeps, ws: web.WebSocketResponse, stream_id: str, policy: LoadPolicy
    ) -> None:
        settings = deps.settings
        self.deps = deps
        self.ws = ws
        self.id = stream_id
        self.settings = settings
        self.metrics = deps.metrics
        self.config = parse_config(
            {}, settings.det_threshold, settings.max_size, settings.stream_max_fps
        )
        self.policy = policy
        self.counters = Counters()
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.waiting: Frame | None = None
        self.frame_ready = asyncio.Event()
        self.outbox: deque[ServerMessage] = deque()
        self.outbox_ready = asyncio.Event()
        self.next_tag: tuple[int, Any] | None = None
        self.auto_seq = 0
        self.last_start = -1e9
        self.pacing = False  # the worker is waiting for the fps cap, not for inference
        self.close_code: int | None = None
        self.closer: asyncio.Task[bool] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.processed_at_last_stats = 0
        self.last_stats = time.perf_counter()

    @property
    def max_fps(self) -> float:
        """The cap in force now: the client's max_fps scaled by the governor's factor."""
        return round(self.config.max_fps * self.policy.fps_factor, 3)

    def next_start_delay(self, now: float) -> float:
        """Seconds until the fps cap lets the worker start another frame."""
        rate = self.max_fps
        if rate <= 0:
            return 1.0  # paused by the governor: the stream is about to be closed anyway
        return max(0.0, self.last_start + 1.0 / rate - now)

    def apply_policy(self, policy: LoadPolicy) -> None:
        self.policy = policy
        if policy.inference_paused:
            self.request_close(CLOSE_TRY_AGAIN, f"inference paused: device is {policy.state}")
            return
        self.enqueue(self.status_message())

    def status_message(self) -> StatusMessage:
        return StatusMessage(
            state=self.policy.state,
            max_fps=self.max_fps,
            accept_new_streams=self.policy.accept_new_streams,
            reason=self.policy.reason,
        )

    def request_close(self, code: int, reason: str) -> None:
        """Close from any task or callback; the reader loop then ends and cleans up."""
        if self.close_code is not None or self.ws.closed:
            return
        self.close_code = code
        log.info("stream_closing", stream_id=self.id, code=int(code), reason=reason)
        # A task: policy callbacks are synchronous, and the worker must not wait on a close
        # handshake that the reader completes. RFC 6455 limits close reasons to 123 bytes.
        self.closer = asyncio.ensure_future(self.ws.close(code=code, message=reason.encode()[:123]))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.task_done)

    def task_done(self, task: asyncio.Task[Any]) -> None:
        """A worker, writer or ticker that failed (backend, cv2.error, a bug) closes the stream
        with 1011 at once: never a silent dead worker behind an open socket."""
        self.tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error("stream_task_failed", stream_id=self.id, error=repr(exc), exc_info=exc)
        self.request_close(CLOSE_INTERNAL, f"internal error ({type(exc).__name__}); see the log")

    def enqueue(self, message: ServerMessage) -> None:
        """Queue a message for the writer; when full, the oldest result makes room."""
        if len(self.outbox) >= self.settings.stream_send_queue:
            victim = next((m for m in self.outbox if isinstance(m, ResultMessage)), self.outbox[0])
            self.outbox.remove(victim)
            if isinstance(victim, ResultMessage):
                self.counters.results_dropped += 1
                self.metrics.results_dropped.inc()
        self.outbox.append(message)
        self.outbox_ready.set()

    async def writer(self) -> None:
        while not self.ws.closed:
            await self.outbox_ready.wait()
            self.outbox_ready.clear()
            while self.outbox and not self.ws.closed:
                message = self.outbox.popleft()
                try:
                    # send_str waits while the socket's buffer is full: only this stream's
                    # writer waits, and meanwhile its outbox drops old results.
                    await self.ws.send_str(encode(message))
                except (ConnectionError, RuntimeError):
                    return

    def stats_message(self) -> StatsMessage:
        now = time.perf_counter()
        c = self.counters
        elapsed = max(now - self.last_stats, 1e-6)
        fps = (c.processed - self.processed_at_last_stats) / elapsed
        self.processed_at_last_stats, self.last_stats = c.processed, now
        recent = list(self.latencies)
        return StatsMessage(
            received=c.received,
            processed=c.processed,
            dropped=c.dropped,
            dropped_replaced=c.replaced,
            dropped_over_fps=c.over_fps,
            dropped_busy=c.busy,
            bad_frames=c.bad,
            results_dropped=c.results_dropped,
            fps=round(fps, 2),
            latency_ms=Latency(p50=percentile(recent, 50), p99=percentile(recent, 99)),
            max_fps=self.max_fps,
            state=self.policy.state,
        )

    async def stats_ticker(self) -> None:
        while not self.ws.closed:
            await asyncio.sleep(self.settings.stream_stats_interval_s)
            self.enqueue(self.stats_message())

    def on_text(self, text: str) -> None:
        s = self.settings
        try:
            message = decode_client_message(text, s.det_threshold, s.max_size, s.stream_max_fps)
        except BadConfig as exc:
            self.request_close(CLOSE_POLICY, f"bad config: {exc}")
            return
        except BadMessage as exc:
            self.bad_message(str(exc))
            return
        if isinstance(message, StreamConfig):
            self.on_config(message)
        else:
            self.next_tag = (message.seq, message.ts)

    def on_config(self, config: StreamConfig) -> None:
        self.config = config
        reply = ConfigAck(max_fps=self.max_fps)
        if config.warnings:
            reply.warnings = list(config.warnings)
        self.enqueue(reply)
        self.enqueue(self.status_message())

    def bad_message(self, error: str, seq: int | None = None) -> None:
        """Count a bad frame or message; beyond STREAM_MAX_BAD_FRAMES the stream is closed."""
        self.counters.bad += 1
        self.metrics.frames.labels("bad").inc()
        if self.counters.bad > self.settings.stream_max_bad_frames:
            self.request_close(
                CLOSE_POLICY, f"more than {self.settings.stream_max_bad_frames} bad frames: {error}"
            )
            return
        self.enqueue(ErrorMessage(seq=seq, error=error))

    def on_frame(self, data: bytes) -> None:
        now = time.perf_counter()
        self.counters.received += 1
        if self.next_tag is not None:
            (seq, ts), self.next_tag = self.next_tag, None
        else:
            seq, ts = self.auto_seq + 1, None
        self.auto_seq = seq
        if not (data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC)):
            # Cheap check here, so garbage is counted even when it would have been replaced.
            self.bad_message("frame is neither JPEG nor PNG", seq)
            return
        if self.waiting is not None:
            # Replaced while the worker waits for the fps cap: the frame came too fast for
            # the cap; replaced while the worker is busy: it came too fast for the model.
            if self.pacing:
                self.counters.over_fps += 1
                self.metrics.frames.labels("over_fps").inc()
            else:
                self.counters.replaced += 1
                self.metrics.frames.labels("replaced").inc()
        self.waiting = Frame(data, seq, ts, now)
        self.frame_ready.set()

    async def worker(self) -> None:
        while not self.ws.closed:
            await self.frame_ready.wait()
            self.frame_ready.clear()
            # The cap paces the worker rather than refusing frames at arrival: frames that
            # come early replace each other, so the newest one is still processed.
            delay = self.next_start_delay(time.perf_counter())
            if delay > 0:
                self.pacing = True
                try:
                    await asyncio.sleep(delay)
                finally:
                    self.pacing = False
            # A shared slot first (`FrameSlots`): frames that arrive while this stream waits
            # for one replace the waiting frame, so the newest frame is the one analysed.
            async with self.deps.slots or contextlib.nullcontext():
                frame, self.waiting = self.waiting, None
                if frame is not None and not await self.handle(frame):
                    return

    async def handle(self, frame: Frame) -> bool:
        """Analyse one frame and queue its result; False when the server is shutting down."""
        start = self.last_start = time.perf_counter()
        try:
            result = await self.process(frame)
        except ImageError as exc:
            self.bad_message(str(exc), frame.seq)
            return True
        except QueueFullError:
            # A full batcher queue or pixel budget: this frame is dropped as busy.
            self.counters.busy += 1
            self.metrics.frames.labels("busy").inc()
            return True
        except BatcherClosedError:
            self.request_close(CLOSE_SHUTDOWN, "server shutdown")
            return False
        done = time.perf_counter()
        latency = done - frame.received
        self.counters.processed += 1
        self.latencies.append(latency * 1e3)
        self.metrics.frames.labels("processed").inc()
        self.metrics.latency.observe(latency)
        self.enqueue(self.result_message(frame, result, (done - start) * 1e3))
        return True

    async def process(self, frame: Frame) -> ImageResult:
        deps = self.deps  # admission (probe, reserve pixels), decode; pixels held until done
        img, held = await decode_admitted(deps.decoder, deps.executor, frame.data)
        with held:
            return await self.analyze(img)

    async def analyze(self, img: ImageArray) -> ImageResult:
        """One decoded frame's faces; `identify_stream` replaces this per stream."""
        if self.config.request.embed_only:
            return await self.deps.analyzer.embed_only(img, source="stream")
        return await self.deps.analyzer.analyze(img, self.config.options)

    def result_message(self, frame: Frame, result: ImageResult, took_ms: float) -> ResultMessage:
        request = self.config.request
        message = ResultMessage(
            seq=frame.seq,
            ts=frame.ts,
            took_ms=round(took_ms, 3),
            latency_ms=round((time.perf_counter() - frame.received) * 1e3, 3),
            faces=[face_out(face, i, request) for i, face in enumerate(result.faces)],
        )
        if request.verbose_timings:
            message.took = {k: round(v, 3) for k, v in result.timings_ms.items()}
        return message

    async def run(self) -> None:
        """The reader loop; returns when the socket closes for any reason."""
        for coro in (self.worker(), self.writer(), self.stats_ticker()):
            self.spawn(coro)
        self.enqueue(self.status_message())
        async for msg in self.ws:
            try:
                if msg.type == WSMsgType.BINARY:
                    self.on_frame(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    self.on_text(msg.data)
            except Exception:
                # A bug, not the client's doing: say so with 1011, never a normal 1000 close.
                log.exception("stream_message_failed", stream_id=self.id)
                self.request_close(CLOSE_INTERNAL, "internal error; see the appliance log")
            if msg.type == WSMsgType.ERROR:
                # aiohttp has already answered an oversize frame with 1009 and closed.
                if isinstance(msg.data, WebSocketError):
                    self.close_code = msg.data.code
                log.info("stream_error", error=str(msg.data))
                break
            if self.close_code is not None:
                break

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        # A requested close finishes (bounded by the WebSocket's close timeout).
        if self.closer is not None:
            await asyncio.gather(self.closer, return_exceptions=True)
        if not self.ws.closed:
            await self.ws.close()
