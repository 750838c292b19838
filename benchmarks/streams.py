"""N concurrent live streams against one appliance: served fps, latency, drops, queue, RSS.

Each stream is a `StreamClient` sending synthetic 640x480 JPEG frames at `--fps`. Unless
`--url` names a running appliance, the benchmark starts `appliance serve` in its own process
on 127.0.0.1 with generated test models (nothing is downloaded). While the streams run it
scrapes `/metrics` for the peak `appliance_queue_depth` and reads the server's RSS from
/proc. Each stream count runs `--repeats` times; the table shows medians.

    python benchmarks/streams.py --streams 1,4,16 --fps 15 --seconds 10

`--real-models [DIR]` serves the real models (default ../shared/models) and streams the frames
of the shared video (short_hamilton_clip.mp4, 640x360) instead, and before each run measures
the models-alone limit on the same frames (`model_limit.py`, both ways, half a run each) to
print the ratio of total served fps to the best limit (medians over the repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np

from appliance.client import StreamClient
from appliance.models.demo import PlantedFace, build_arcface_model, build_scrfd_model

FACES = (PlantedFace.square(100, 120, 80), PlantedFace.square(300, 200, 150))
SHARED = Path(__file__).resolve().parents[2] / "shared"
VIDEO = "short_hamilton_clip.mp4"
WAYS = ("shared", "per-core")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_frames(count: int, seed: int) -> list[bytes]:
    """Smooth 640x480 JPEGs (photo-like sizes; noise would make decoding the bottleneck)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        small = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        img = cv2.resize(small, (640, 480), interpolation=cv2.INTER_CUBIC)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        frames.append(bytes(buf.tobytes()))
    return frames


def video_frames(path: Path, count: int) -> list[bytes]:
    """The first `count` frames of a video, as the JPEGs a camera client would send."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        frames.append(bytes(buf.tobytes()))
    capture.release()
    if not frames:
        raise SystemExit(f"no frames could be read from {path}")
    return frames


def start_server(
    directory: Path,
    port: int,
    layers: int,
    channels: int,
    det_batch: int,
    real_models: Path | None = None,
) -> subprocess.Popen[bytes]:
    if real_models is None:
        build_scrfd_model(
            directory / "det.onnx", FACES, trunk_layers=layers, trunk_channels=channels
        )
        build_arcface_model(directory / "rec.onnx")
        override = {
            "bench_scrfd": {"family": "scrfd", "file": "det.onnx"},
            "bench_arcface": {"family": "arcface", "file": "rec.onnx"},
        }
        (directory / "models.override.json").write_text(json.dumps(override))
    env = {
        **os.environ,
        "MODELS_DIR": str(real_models or directory),
        "DET_MODEL": "scrfd_2.5g_bnkps" if real_models else "bench_scrfd",
        "REC_MODEL": "mobilefacenet_128" if real_models else "bench_arcface",
        "TRUST_UNVERIFIED": "1",
        "INFERENCE_BACKEND": "onnx",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DET_BATCH_SIZE": str(det_batch),
        "REC_BATCH_SIZE": "16",
        "MAX_STREAMS": "64",
        "STREAM_STATS_INTERVAL_S": "1",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "json",
    }
    # The server runs in its own process (its own GIL, as in production) through the app
    # factory, with the settings above taken from the environment like `appliance serve`.
    return subprocess.Popen(
        [sys.executable, __file__, "--serve-child"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def serve_child() -> None:
    from aiohttp import web

    from appliance.api.app import create_app
    from appliance.config import load_settings
    from appliance.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    web.run_app(
        create_app(settings), host=settings.host, port=settings.port, print=None, access_log=None
    )


async def wait_ready(base: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"the appliance exited at start:\n{err}")
            try:
                async with session.get(f"{base}/health/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{base} was not ready within {timeout} s")


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def queue_depth(metrics_text: str) -> float:
    values = re.findall(r"^appliance_queue_depth\{[^}]*\} ([0-9.e+-]+)$", metrics_text, re.M)
    return sum(float(v) for v in values)


async def one_run(
    url: str,
    base: str,
    pid: int | None,
    streams: int,
    fps: float,
    seconds: float,
    embed: bool,
    frames: list[bytes] | None = None,
) -> dict[str, Any]:
    frames = frames or make_frames(8, seed=streams)
    frame_count = int(fps * seconds)
    peak = {"queue": 0.0, "rss": 0.0}
    rss_samples: list[tuple[float, float]] = []
    sampling = True

    async def sample(session: aiohttp.ClientSession) -> None:
        started = time.monotonic()
        while sampling:
            async with session.get(f"{base}/metrics") as resp:
                peak["queue"] = max(peak["queue"], queue_depth(await resp.text()))
            if pid is not None:
                rss = rss_mb(pid)
                peak["rss"] = max(peak["rss"], rss)
                rss_samples.append((time.monotonic() - started, rss))
            await asyncio.sleep(0.1)

    async def source(offset: int) -> AsyncIterator[bytes]:
        for i in range(frame_count):
            yield frames[(i + offset) % len(frames)]

    async def stream(i: int, session: aiohttp.ClientSession) -> dict[str, Any]:
        config = {"max_fps": fps, "extract_embedding": embed}
        async with StreamClient(url, config=config, session=session) as client:
            stats = await client.run(source(i), fps=fps, drain_timeout=5)
            return {
                "sent": stats.sent,
                "results": stats.results,
                "elapsed": stats.elapsed_s,
                "dropped": stats.dropped,
                "latencies": list(stats.latencies_ms),
            }

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sampler = asyncio.create_task(sample(session))
        try:
            per_stream = await asyncio.gather(*(stream(i, session) for i in range(streams)))
        finally:
            sampling = False
            await sampler
    latencies = [x for s in per_stream for x in s["latencies"]]
    served = [s["results"] / seconds for s in per_stream]
    return {
        "streams": streams,
        "fps_per_stream": statistics.median(served),
        "fps_total": sum(served),
        "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies else float("nan"),
        "latency_p99_ms": float(np.percentile(latencies, 99)) if latencies else float("nan"),
        "sent": sum(s["sent"] for s in per_stream),
        "dropped": sum(s["dropped"] for s in per_stream),
        "peak_queue_depth": peak["queue"],
        "peak_rss_mb": peak["rss"],
        # Growth check for long runs: the peak of the first and of the last tenth of the run.
        "rss_first_tenth_mb": max(
            (r for t, r in rss_samples if t <= seconds / 10), default=float("nan")
        ),
        "rss_last_tenth_mb": max(
            (r for t, r in rss_samples if t >= seconds * 0.9), default=float("nan")
        ),
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url = args.url
            base = re.sub(r"^ws", "http", url).rsplit("/ws/stream", 1)[0]
        else:
            port = free_port()
            proc = start_server(
                Path(tmp),
                port,
                args.trunk_layers,
                args.trunk_channels,
                1 if args.real_models else args.det_batch,
                args.real_models,
            )
            base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws/stream"
        try:
            await wait_ready(base, proc, 60)
            rows = []
            for n in args.streams:
                runs = []
                for _ in range(args.repeats):
                    # The limit right before each run: on a shared machine the load moves
                    # between minutes, and a ratio must compare like with like.
                    limit_now = args.limit() if args.limit else None
                    run = await one_run(
                        url,
                        base,
                        proc.pid if proc else None,
                        n,
                        args.fps,
                        args.seconds,
                        args.embeddings,
                        args.frames,
                    )
                    if limit_now:
                        run["limit_fps"] = limit_now
                        run["ratio_to_limit"] = run["fps_total"] / limit_now
                    runs.append(run)
                row = median_of(runs)
                rows.append(row)
                print(format_row(row, args.fps), flush=True)
                print(
                    f"<!-- RSS peak in the first / last tenth of the run: "
                    f"{row['rss_first_tenth_mb']:.0f} / {row['rss_last_tenth_mb']:.0f} MB -->",
                    flush=True,
                )
            return rows
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


HEADER = (
    "| streams | fps asked/stream | served fps/stream | served fps total | latency p50 ms | "
    "latency p99 ms | frames sent | dropped | peak queue depth | peak RSS MB |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(r: dict[str, Any], fps: float) -> str:
    ratio = f" {r['limit_fps']:.2f} | {r['ratio_to_limit']:.2f} |" if "ratio_to_limit" in r else ""
    return (
        f"| {r['streams']:.0f} | {fps:g} | {r['fps_per_stream']:.1f} | {r['fps_total']:.1f} | "
        f"{r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} | {r['sent']:.0f} | "
        f"{r['dropped']:.0f} | {r['peak_queue_depth']:.0f} | {r['peak_rss_mb']:.0f} |{ratio}"
    )


def main() -> None:
    if sys.argv[1:] == ["--serve-child"]:
        serve_child()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="ws://HOST:PORT/ws/stream of a running appliance")
    parser.add_argument(
        "--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16]
    )
    parser.add_argument("--fps", type=float, default=15.0, help="frames per second per stream")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per stream count (median)")
    parser.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--trunk-layers", type=int, default=2, help="own server's detector cost")
    parser.add_argument("--trunk-channels", type=int, default=16)
    parser.add_argument("--det-batch", type=int, default=8)
    parser.add_argument("--json-out", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--real-models",
        type=Path,
        nargs="?",
        const=SHARED / "models",
        help="serve the real models and stream the shared video (default: ../shared/models)",
    )
    parser.add_argument("--video-frames", type=int, default=90, help="frames of the video used")
    parser.add_argument(
        "--limit-seconds", type=float, help="each models-alone measurement (default: half a run)"
    )
    args = parser.parse_args()
    args.frames, args.limit = None, None
    print(
        f"# {platform.node()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    if args.real_models:
        from model_limit import limit, prepare  # beside this script

        args.frames = video_frames(SHARED / "photos" / VIDEO, args.video_frames)
        preps = [prepare(args.real_models, f) for f in args.frames]
        faces = sum(len(p.crops) for p in preps) / len(preps)

        def best_limit() -> float:
            seconds = args.limit_seconds or args.seconds / 2
            ways = {w: limit(args.real_models, preps, seconds, w == "per-core") for w in WAYS}
            print(
                f"<!-- models alone on {len(preps)} video frames ({faces:.1f} faces/frame): "
                + ", ".join(f"{w} {v:.2f} fps" for w, v in ways.items())
                + " -->",
                flush=True,
            )
            return max(ways.values())

        args.limit = best_limit
    top, rule = HEADER.split("\n")
    if args.real_models:
        top, rule = top + " models-alone fps | ratio to limit |", rule + "---:|---:|"
    print(f"{top}\n{rule}", flush=True)
    rows = asyncio.run(bench(args))
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {"args": vars(args) | {"json_out": None, "frames": None}, "rows": rows},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
