"""One measured run of N live streams against a running appliance (used by `streams.py`).

Every stream sends frames at its pace until told to stop. Nothing is counted during a warm-up
(connections, first model runs, queues filling); then a window of fixed length opens, and
both sides are read at its start and end:

- the client counts the frames it sent and the results it received inside the window, with
  each result's latency (frame sent -> result received) and its faces;
- the server's `/metrics` counters (stream frames by outcome, batch items and backend calls
  per model, backend seconds) and its process CPU time (/proc) are read at both ends, so the
  served rate is the server's own count of frames processed in the window, not an estimate.

Frames still in flight when the window closes are not counted, and neither are results
that arrive after it: the rate is work done per second of window, the same unit as the
models-alone loop's frames per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from appliance.client import StreamClient

# Send times of frames not answered yet; the server drops most frames when overloaded
# (latest frame wins), so their send times are forgotten oldest first past this many.
SENT_WINDOW = 256
METRIC_LINE = re.compile(r"^(appliance_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+|NaN)$", re.M)
# Each scrape costs the server a /metrics render: twice a second is enough for a peak.
SAMPLE_EVERY_S = 0.5


@dataclasses.dataclass
class Window:
    start: float = float("inf")
    end: float = float("inf")

    def holds(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclasses.dataclass
class Tally:
    """One stream's counts inside the window (and over the whole run, for comparison)."""

    sent: int = 0
    results: int = 0
    faces: int = 0
    errors: int = 0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    results_whole_run: int = 0


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The server at one moment: its counters and its CPU time."""

    at: float
    values: dict[str, float]
    cpu_s: float | None

    def get(self, name: str, **labels: str) -> float:
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(
            v
            for key, v in self.values.items()
            if key.split("{")[0] == name and all(w in key for w in want)
        )


def parse_metrics(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in METRIC_LINE.finditer(text)}


def process_cpu_s(pid: int) -> float:
    """User + system seconds of a process, all threads (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


async def snapshot(session: aiohttp.ClientSession, base: str, pid: int | None) -> Snapshot:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return Snapshot(time.perf_counter(), parse_metrics(text), process_cpu_s(pid) if pid else None)


async def drive_stream(
    url: str,
    session: aiohttp.ClientSession,
    frames: list[bytes],
    offset: int,
    fps: float,
    phase_s: float,
    config: dict[str, Any],
    window: Window,
    stop: asyncio.Event,
    tally: Tally,
) -> None:
    """Send `frames` (cycled, starting at `offset`) at `fps` until `stop`; tally the window."""
    sent_at: dict[int, float] = {}

    def on_message(message: dict[str, Any]) -> None:
        now = time.perf_counter()
        if message.get("type") == "error":
            tally.errors += 1
        if message.get("type") != "result":
            return
        tally.results_whole_run += 1
        sent = sent_at.pop(int(message["seq"]), None)
        if window.holds(now):
            tally.results += 1
            tally.faces += len(message.get("faces") or [])
            if sent is not None:
                tally.latencies_ms.append((now - sent) * 1e3)

    interval = 1.0 / fps
    async with StreamClient(url, config=config, session=session) as client:
        client.on_message(on_message)
        # Streams start out of step, as independent cameras do.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), phase_s)
        next_at = time.perf_counter()
        seq = 0
        while not stop.is_set():
            seq += 1
            now = time.perf_counter()
            sent_at[seq] = now
            if len(sent_at) > SENT_WINDOW:
                del sent_at[next(iter(sent_at))]
            await client.send_frame(frames[(offset + seq) % len(frames)], seq=seq)
            if window.holds(now):
                tally.sent += 1
            # A sender that fell behind (a busy loop) skips ahead instead of bursting.
            next_at = max(next_at + interval, time.perf_counter() - interval)
            delay = next_at - time.perf_counter()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 90, 99)) -> list[float]:
    if not values:
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values), qs)]


async def measure(
    url: str,
    base: str,
    pid: int | None,
    streams: int,
    fps: float,
    warmup_s: float,
    window_s: float,
    frames: list[bytes],
    config: dict[str, Any],
) -> dict[str, Any]:
    """Run `streams` streams for `warmup_s` + `window_s`; the window's figures."""
    window = Window()
    stop = asyncio.Event()
    tallies = [Tally() for _ in range(streams)]
    # t, detector queue, recognizer queue, stream frames in analysis, RSS
    samples: list[tuple[float, float, float, float, float]] = []

    async def sampler(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            snap = await snapshot(session, base, None)
            samples.append(
                (
                    snap.at,
                    snap.get("appliance_queue_depth", model="detector"),
                    snap.get("appliance_queue_depth", model="recognizer"),
                    snap.get("appliance_stream_frames_in_analysis"),
                    rss_mb(pid) if pid else float("nan"),
                )
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [
            asyncio.create_task(
                drive_stream(
                    url,
                    session,
                    frames,
                    i * len(frames) // streams,
                    fps,
                    i / (streams * fps),
                    config,
                    window,
                    stop,
                    tallies[i],
                )
            )
            for i in range(streams)
        ]
        sampling = asyncio.create_task(sampler(session))
        try:
            await asyncio.sleep(warmup_s)
            before = await snapshot(session, base, pid)
            client_cpu0 = time.process_time()
            window.start = time.perf_counter()
            await asyncio.sleep(window_s)
            window.end = time.perf_counter()
            client_cpu = time.process_time() - client_cpu0
            after = await snapshot(session, base, pid)
        finally:
            stop.set()
            results = await asyncio.gather(*tasks, sampling, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
    return summarise(tallies, window, before, after, samples, client_cpu, streams, fps)


def summarise(
    tallies: list[Tally],
    window: Window,
    before: Snapshot,
    after: Snapshot,
    samples: list[tuple[float, float, float, float, float]],
    client_cpu_s: float,
    streams: int,
    fps: float,
) -> dict[str, Any]:
    seconds = window.end - window.start

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    frames_metric = "appliance_stream_frames_total"
    processed = delta(frames_metric, outcome="processed")
    det_items = delta("appliance_batch_items_total", model="detector")
    rec_items = delta("appliance_batch_items_total", model="recognizer")
    results = sum(t.results for t in tallies)
    latencies = [x for t in tallies for x in t.latencies_ms]
    per_stream_p50 = [percentiles(t.latencies_ms, (50,))[0] for t in tallies if t.latencies_ms]
    inside = [s for s in samples if window.holds(s[0])]
    tenth = max(seconds / 10, SAMPLE_EVERY_S)  # at least one sample at each end
    server_cpu = (
        after.cpu_s - before.cpu_s if after.cpu_s is not None and before.cpu_s is not None else None
    )
    p50, p90, p99 = percentiles(latencies)
    return {
        "streams": streams,
        "fps_asked": fps,
        "window_s": seconds,
        "sent": sum(t.sent for t in tallies),
        # Frames whose fate was settled in the window: processed, replaced, busy or bad.
        "settled": delta(frames_metric),
        "processed": processed,
        "served_fps": processed / seconds,
        "results": results,
        "results_fps": results / seconds,
        "dropped_replaced": delta(frames_metric, outcome="replaced"),
        "dropped_over_fps": delta(frames_metric, outcome="over_fps"),
        "dropped_busy": delta(frames_metric, outcome="busy"),
        "bad": delta(frames_metric, outcome="bad"),
        "results_dropped": delta("appliance_stream_results_dropped_total"),
        "errors": sum(t.errors for t in tallies),
        "det_items": det_items,
        "det_calls": delta("appliance_backend_calls_total", model="detector"),
        "rec_items": rec_items,
        "rec_calls": delta("appliance_backend_calls_total", model="recognizer"),
        "faces_per_frame": rec_items / det_items if det_items else float("nan"),
        "faces_per_result": sum(t.faces for t in tallies) / results if results else float("nan"),
        "det_busy_s": delta("appliance_batch_duration_seconds_sum", model="detector"),
        "rec_busy_s": delta("appliance_batch_duration_seconds_sum", model="recognizer"),
        "latency_p50_ms": p50,
        "latency_p90_ms": p90,
        "latency_p99_ms": p99,
        "stream_p50_min_ms": min(per_stream_p50, default=float("nan")),
        "stream_p50_max_ms": max(per_stream_p50, default=float("nan")),
        "streams_served": len(per_stream_p50),
        "det_queue_peak": max((s[1] for s in inside), default=float("nan")),
        "det_queue_mean": statistics.fmean(s[1] for s in inside) if inside else float("nan"),
        "rec_queue_peak": max((s[2] for s in inside), default=float("nan")),
        "in_analysis_peak": max((s[3] for s in inside), default=float("nan")),
        "frame_slots": after.get("appliance_stream_frame_slots"),
        "rss_peak_mb": max((s[4] for s in inside), default=float("nan")),
        "rss_first_tenth_mb": max(
            (s[4] for s in inside if s[0] < window.start + tenth), default=float("nan")
        ),
        "rss_last_tenth_mb": max(
            (s[4] for s in inside if s[0] >= window.end - tenth), default=float("nan")
        ),
        "server_cpu_ms_per_frame": (
            server_cpu * 1e3 / processed if server_cpu is not None and processed else float("nan")
        ),
        "server_cores": server_cpu / seconds if server_cpu is not None else float("nan"),
        "client_cores": client_cpu_s / seconds,
        # What the previous version of this benchmark printed: every result of the whole run
        # (warm-up and the drain after the last frame included) over the nominal seconds.
        "results_whole_run": sum(t.results_whole_run for t in tallies),
    }
