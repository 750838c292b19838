"""`StreamClient`: send live frames to `/ws/stream` and read the results (asyncio + aiohttp).

Apps import it; `appliance stream` is a thin command around it. Sending and receiving are
independent: `send_frame` never waits for a result, and a background task reads every
message, so the client itself never builds a backlog (the server drops what it cannot
process, latest frame wins).

    async with StreamClient("ws://127.0.0.1:18080/ws/stream", config={"max_fps": 10}) as c:
        await c.send_frame(jpeg_bytes)
        result = await c.next_result(timeout=5)
        print(result.seq, [f["bbox"] for f in result.faces])
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import deque
from collections.abc import AsyncIterable, Callable
from types import TracebackType
from typing import Any

import aiohttp
import msgspec
import numpy as np

from appliance.api.stream_protocol import ConfigMessage, FrameTag
from appliance.api.wire import dec_hook

# Recent round trips kept for the p50/p99 the summary shows.
LATENCY_WINDOW = 1024


class StreamClosed(ConnectionError):
    """The server closed the stream; `code` is the WebSocket close code."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"stream closed by the server: {code} {reason}".strip())
        self.code = code
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class StreamResult:
    seq: int
    ts: Any
    took_ms: float
    faces: list[dict[str, Any]]
    latency_ms: float | None  # send -> result, measured by this client
    raw: dict[str, Any]


@dataclasses.dataclass
class ClientStats:
    sent: int = 0
    results: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    latencies_ms: deque[float] = dataclasses.field(
        default_factory=lambda: deque(maxlen=LATENCY_WINDOW)
    )
    server: dict[str, Any] = dataclasses.field(default_factory=dict)  # last "stats" message
    status: dict[str, Any] = dataclasses.field(default_factory=dict)  # last "status" message
    errors: int = 0

    @property
    def elapsed_s(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    @property
    def dropped(self) -> int:
        """Frames the server dropped, as of its last stats message."""
        return int(self.server.get("dropped", 0))

    def latency_percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    def as_dict(self) -> dict[str, Any]:
        elapsed = self.elapsed_s
        return {
            "elapsed_s": round(elapsed, 3),
            "sent": self.sent,
            "results": self.results,
            "sent_fps": round(self.sent / elapsed, 2),
            "result_fps": round(self.results / elapsed, 2),
            "dropped": self.dropped,
            "errors": self.errors,
            "latency_ms": {
                "p50": _round(self.latency_percentile(50)),
                "p99": _round(self.latency_percentile(99)),
            },
            "state": self.status.get("state"),
            "max_fps": self.status.get("max_fps"),
        }

    def summary(self) -> str:
        d = self.as_dict()
        p50, p99 = d["latency_ms"]["p50"], d["latency_ms"]["p99"]
        latency = f"{p50:.0f}/{p99:.0f} ms" if p50 is not None and p99 is not None else "-"
        return (
            f"sent {d['sent']} ({d['sent_fps']:.1f} fps)  results {d['results']} "
            f"({d['result_fps']:.1f} fps)  dropped {d['dropped']}  latency p50/p99 {latency}  "
            f"state {d['state'] or '-'}"
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class StreamClient:
    """One live stream. Use as an async context manager, or call `connect()`/`close()`."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        config: dict[str, Any] | None = None,
        session: aiohttp.ClientSession | None = None,
        result_queue: int = 64,
        heartbeat: float | None = 10.0,
    ) -> None:
        self.url = url
        self.token = token
        self.config = config
        self.stats = ClientStats()
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._heartbeat = heartbeat
        # Results wait here for `next_result`/`results`; when the app does not consume them,
        # the oldest go (this client must not grow without bound either).
        self._results: deque[StreamResult] = deque(maxlen=result_queue)
        self._result_ready = asyncio.Event()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._sent_at: dict[int, float] = {}
        self._seq = 0
        self._last_result_seq = 0
        self.closed: StreamClosed | None = None

    async def __aenter__(self) -> StreamClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            self._ws = await self._session.ws_connect(
                self.url, headers=headers, heartbeat=self._heartbeat, max_msg_size=0
            )
        except BaseException:
            if self._own_session:
                await self._session.close()
                self._session = None
            raise
        self.stats = ClientStats()
        self._reader = asyncio.create_task(self._read_loop())
        if self.config:
            await self.configure(self.config)

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def on_message(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call `callback` with every message from the server (results, stats, status...)."""
        self._listeners.append(callback)

    async def configure(self, config: dict[str, Any]) -> None:
        """Send a config message: the /extract options plus `max_fps`.

        Checked against the protocol's `ConfigMessage` first (ValueError names the field), so a
        typo'd value fails here rather than as a 1008 close; unknown keys still go to the
        server, which reports them as warnings.
        """
        message = {**config, "type": "config"}
        try:
            msgspec.convert(message, ConfigMessage, strict=False, dec_hook=dec_hook)
        except msgspec.ValidationError as exc:
            raise ValueError(f"stream config: {exc}") from None
        await self._socket().send_json(message)

    async def send_frame(
        self, data: bytes, seq: int | None = None, ts: float | int | str | None = None
    ) -> int:
        """Send one JPEG/PNG frame, tagged with `seq` (default: the next number) and `ts`."""
        if self.closed is not None:
            raise self.closed
        ws = self._socket()
        self._seq = self._seq + 1 if seq is None else seq
        ts = time.time() if ts is None else ts
        await ws.send_str(msgspec.json.encode(FrameTag(seq=self._seq, ts=ts)).decode())
        await ws.send_bytes(data)
        self._sent_at[self._seq] = time.perf_counter()
        if len(self._sent_at) > LATENCY_WINDOW:
            # Frames the server dropped never get a result: forget the oldest send times.
            for old in sorted(self._sent_at)[: len(self._sent_at) - LATENCY_WINDOW]:
                del self._sent_at[old]
        self.stats.sent += 1
        return self._seq

    async def next_result(self, timeout: float | None = None) -> StreamResult:
        """The oldest unread result; raises StreamClosed when the stream has ended."""

        async def wait() -> StreamResult:
            while not self._results:
                if self.closed is not None:
                    raise self.closed
                self._result_ready.clear()
                await self._result_ready.wait()
            return self._results.popleft()

        return await asyncio.wait_for(wait(), timeout)

    async def run(
        self,
        frames: AsyncIterable[bytes],
        fps: float | None = None,
        drain_timeout: float = 5.0,
    ) -> ClientStats:
        """Send every frame of `frames` (paced to `fps` if given) and wait for the last result."""
        interval = 1.0 / fps if fps else 0.0
        next_at = time.perf_counter()
        last_seq = None
        async for frame in frames:
            if self.closed is not None:
                raise self.closed
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + interval, time.perf_counter() - interval)
            last_seq = await self.send_frame(frame)
        if last_seq is not None:
            # The server always processes the newest frame: its result closes the run.
            deadline = time.perf_counter() + drain_timeout
            while (self.stats.server.get("received", 0) < self.stats.sent) or (
                self._last_result_seq < last_seq
            ):
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self.closed is not None:
                    break
                self._result_ready.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._result_ready.wait(), min(remaining, 0.5))
        return self.stats

    def _socket(self) -> aiohttp.ClientWebSocketResponse[bool]:
        if self._ws is None:
            raise RuntimeError("StreamClient is not connected; call connect() first")
        return self._ws

    async def _read_loop(self) -> None:
        ws = self._socket()
        reason = ""
        try:
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._handle(json.loads(msg.data))
                elif msg.type == aiohttp.WSMsgType.CLOSE:
                    reason = str(msg.extra or "")
                    break
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    break
        finally:
            self.closed = StreamClosed(ws.close_code, reason)
            self._result_ready.set()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "result":
            seq = int(message["seq"])
            sent = self._sent_at.pop(seq, None)
            latency = (time.perf_counter() - sent) * 1e3 if sent is not None else None
            if latency is not None:
                self.stats.latencies_ms.append(latency)
            self.stats.results += 1
            self._last_result_seq = max(self._last_result_seq, seq)
            self._results.append(
                StreamResult(
                    seq=seq,
                    ts=message.get("ts"),
                    took_ms=float(message.get("took_ms", 0.0)),
                    faces=list(message.get("faces", [])),
                    latency_ms=latency,
                    raw=message,
                )
            )
            self._result_ready.set()
        elif kind == "stats":
            self.stats.server = message
            self._result_ready.set()
        elif kind == "status":
            self.stats.status = message
        elif kind == "error":
            self.stats.errors += 1
        for callback in self._listeners:
            callback(message)
