"""Overload and soak: drive `appliance serve` (a real process on loopback) past its capacity.

    python benchmarks/overload.py overload --seconds 20     # REST + streams past capacity
    python benchmarks/overload.py soak --seconds 1800       # REST + streams together, long

Overload: a baseline (one REST client), then many REST clients and greedy streams at once,
then one client again. It reports the status codes (only 200 and 503 + Retry-After are
allowed), stream frames dropped as designed, the largest queue depth and pixels in flight seen
in /metrics against their limits, the server's peak RSS, admitted requests' latency, and how
long after the load stopped the first request succeeded (recovery).

Soak: moderate REST and stream load for the whole time; RSS after warm-up vs at the end, and
file descriptors and threads before the load vs after it. tests/test_overload.py runs both in
short forms and asserts the limits; `make soak` runs the long soak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, benchmarks/ is on the path, not the repo

from appliance.models.demo import PlantedFace, build_arcface_model, build_scrfd_model  # noqa: E402
from tests.serve_process import ServedProcess, appliance_serve  # noqa: E402

FACES = (PlantedFace.square(100, 120, 80, score=0.95), PlantedFace.square(300, 380, 200))
MAX_QUEUE = 16


def write_models(directory: Path) -> None:
    # The small test trunk (a few ms a batch): capacity is reached by client count, and a
    # 2-core CI machine still finishes the short forms quickly.
    build_scrfd_model(directory / "det.onnx", FACES)
    build_arcface_model(directory / "rec.onnx")
    override = {
        "load_scrfd": {"family": "scrfd", "file": "det.onnx"},
        "load_arcface": {"family": "arcface", "file": "rec.onnx"},
    }
    (directory / "models.override.json").write_text(json.dumps(override))


# The harness's process: base and ws URLs, the pid for /proc, the log.
Server = ServedProcess


@contextlib.contextmanager
def serve(workdir: Path, **env: str) -> Iterator[Server]:
    """`appliance serve` on a free loopback port with the load models; SIGTERM at the end.

    Its watchdog reads the harness's calm sysfs tree: what it sheds is the load's doing,
    never a hot or busy host's.
    """
    models = workdir / "models"
    models.mkdir(exist_ok=True)
    if not (models / "det.onnx").exists():
        write_models(models)
    settings = {
        "MODELS_DIR": str(models),
        "DET_MODEL": "load_scrfd",
        "REC_MODEL": "load_arcface",
        "TRUST_UNVERIFIED": "1",
        "INFERENCE_BACKEND": "onnx",
        "MAX_QUEUE": str(MAX_QUEUE),
        "MAX_STREAMS": "8",
        "STREAM_STATS_INTERVAL_S": "1",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        **env,
    }
    # 60 s to stop: the SIGTERM test gives the server a long grace to finish accepted work.
    with appliance_serve(
        "--no-fetch", env=settings, log_dir=workdir, ready_timeout=90, stop_timeout=60
    ) as server:
        yield server


def frame(seed: int = 0, width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return bytes(cv2.imencode(".jpg", img)[1])


def extract_body(images: int = 2) -> dict[str, Any]:
    import base64

    return {"images": {"data": [base64.b64encode(frame(i)).decode() for i in range(images)]}}


# ---------------------------------------------------------------- process facts


def proc_status(pid: int) -> dict[str, int]:
    """RSS (bytes), threads and open file descriptors of a process, from /proc."""
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss": rss, "threads": threads, "fds": fds}


def metric(text: str, name: str, **labels: str) -> float:
    label_re = "".join(f'(?=[^}}]*{k}="{v}")' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{{label_re}[^}}]*\}})? ([0-9.e+-]+)$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


# ---------------------------------------------------------------- load


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    missing_retry_after: int = 0
    non_json_errors: int = 0
    latencies_ok: list[float] = field(default_factory=list)
    stream_results: int = 0
    stream_frames_sent: int = 0
    stream_closes: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0


async def rest_client(
    session: aiohttp.ClientSession, base: str, body: dict[str, Any], stop: asyncio.Event, t: Tally
) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            async with session.post(f"{base}/extract", json=body) as resp:
                payload = await resp.read()
                t.statuses[resp.status] += 1
                if resp.status == 200:
                    t.latencies_ok.append(time.perf_counter() - start)
                    continue
                if resp.status == 503 and "Retry-After" not in resp.headers:
                    t.missing_retry_after += 1
                try:
                    json.loads(payload)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    t.non_json_errors += 1
        except aiohttp.ClientError:
            t.connection_errors += 1
            await asyncio.sleep(0.05)


async def stream_client(
    session: aiohttp.ClientSession, url: str, data: bytes, stop: asyncio.Event, t: Tally
) -> None:
    """A greedy camera: sends frames back to back, reads results as they come."""
    async with session.ws_connect(url) as ws:

        async def reader() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT and '"type":"result"' in msg.data:
                    t.stream_results += 1

        task = asyncio.ensure_future(reader())
        while not stop.is_set() and not ws.closed:
            await ws.send_bytes(data)
            t.stream_frames_sent += 1
            await asyncio.sleep(0.005)
        await ws.close()
        await asyncio.gather(task, return_exceptions=True)
        t.stream_closes[ws.close_code or 0] += 1


@dataclass
class Peaks:
    queue: float = 0.0
    pixels: float = 0.0
    pixels_limit: float = 0.0
    rss: int = 0
    samples: list[dict[str, int]] = field(default_factory=list)


async def sampler(
    session: aiohttp.ClientSession, server: Server, stop: asyncio.Event, peaks: Peaks
) -> None:
    while not stop.is_set():
        async with session.get(f"{server.base}/metrics") as resp:
            text = await resp.text()
        peaks.queue = max(
            peaks.queue,
            metric(text, "appliance_queue_depth", model="detector"),
            metric(text, "appliance_queue_depth", model="recognizer"),
        )
        peaks.pixels = max(peaks.pixels, metric(text, "appliance_pixels_in_flight"))
        peaks.pixels_limit = metric(text, "appliance_pixels_in_flight_limit")
        status = proc_status(server.proc.pid)
        peaks.rss = max(peaks.rss, status["rss"])
        peaks.samples.append(status)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def load_phase(
    server: Server, seconds: float, rest: int, streams: int, body: dict[str, Any]
) -> tuple[Tally, Peaks]:
    t, peaks, stop = Tally(), Peaks(), asyncio.Event()
    connector = aiohttp.TCPConnector(limit=rest + streams + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        data = frame(7)
        tasks = [rest_client(session, server.base, body, stop, t) for _ in range(rest)]
        tasks += [stream_client(session, server.ws, data, stop, t) for _ in range(streams)]
        tasks.append(sampler(session, server, stop, peaks))
        runner = asyncio.gather(*tasks)
        await asyncio.sleep(seconds)
        stop.set()
        await runner
    return t, peaks


async def recovery(server: Server, body: dict[str, Any], limit_s: float = 30) -> tuple[float, int]:
    """Seconds from the end of the load to the first 200, and the requests it took."""
    start = time.perf_counter()
    attempts = 0
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() - start < limit_s:
            attempts += 1
            async with session.post(f"{server.base}/extract", json=body) as resp:
                await resp.read()
                if resp.status == 200:
                    return time.perf_counter() - start, attempts
    return float("inf"), attempts


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)) * 1e3, 1) if values else 0.0


async def overload(
    server: Server, seconds: float, rest: int = 24, streams: int = 6
) -> dict[str, Any]:
    body = extract_body()
    base, _ = await load_phase(server, min(3.0, seconds / 4), 1, 0, body)
    over, peaks = await load_phase(server, seconds, rest, streams, body)
    recovery_s, attempts = await recovery(server, body)
    after, _ = await load_phase(server, min(3.0, seconds / 4), 1, 0, body)
    return {
        "baseline_p50_ms": ms(base.latencies_ok, 50),
        "statuses": dict(over.statuses),
        "missing_retry_after": over.missing_retry_after,
        "non_json_errors": over.non_json_errors,
        "connection_errors": over.connection_errors,
        "admitted_p50_ms": ms(over.latencies_ok, 50),
        "admitted_p99_ms": ms(over.latencies_ok, 99),
        "admitted_max_ms": ms(over.latencies_ok, 100),
        "stream_frames_sent": over.stream_frames_sent,
        "stream_results": over.stream_results,
        "stream_closes": dict(over.stream_closes),
        "peak_queue_depth": peaks.queue,
        "max_queue": MAX_QUEUE,
        "peak_pixels_in_flight": peaks.pixels,
        "pixels_limit": peaks.pixels_limit,
        "peak_rss_mb": round(peaks.rss / 2**20, 1),
        "final_rss_mb": round(proc_status(server.proc.pid)["rss"] / 2**20, 1),
        "recovery_s": round(recovery_s, 3),
        "recovery_attempts": attempts,
        "after_statuses": dict(after.statuses),
        "after_p50_ms": ms(after.latencies_ok, 50),
    }


async def soak(server: Server, seconds: float, rest: int = 2, streams: int = 2) -> dict[str, Any]:
    """Moderate load for `seconds`; RSS after warm-up (a fifth of the time) vs at the end."""
    body = extract_body()
    # Warm-up under the same load: lazy imports, executor threads and pools reach their size.
    await load_phase(server, 3, rest, streams, body)
    await asyncio.sleep(1)
    before = proc_status(server.proc.pid)
    t, peaks = await load_phase(server, seconds, rest, streams, body)
    await asyncio.sleep(2)  # streams' and connections' tear-down finishes
    after = proc_status(server.proc.pid)
    samples = peaks.samples
    warm = samples[max(1, len(samples) // 5)]["rss"]
    end = statistics.median(s["rss"] for s in samples[-5:])
    return {
        "seconds": seconds,
        "statuses": dict(t.statuses),
        "stream_results": t.stream_results,
        "rss_before_mb": round(before["rss"] / 2**20, 1),
        "rss_warm_mb": round(warm / 2**20, 1),
        "rss_end_mb": round(end / 2**20, 1),
        "rss_growth_pct": round(100 * (end - warm) / warm, 2),
        "peak_rss_mb": round(peaks.rss / 2**20, 1),
        "fds_before": before["fds"],
        "fds_after": after["fds"],
        "threads_before": before["threads"],
        "threads_after": after["threads"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("overload", "soak"))
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, serve(args.workdir or Path(tmp)) as server:
        run = overload if args.mode == "overload" else soak
        report = asyncio.run(run(server, args.seconds))
    print(json.dumps({"mode": args.mode, **report}, indent=2))


if __name__ == "__main__":
    main()
