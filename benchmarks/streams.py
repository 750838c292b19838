"""N concurrent live streams against one appliance: frames served against the models alone.

Unless `--url` names a running appliance, the benchmark starts `appliance serve`'s app in its
own process on 127.0.0.1. Each run opens N streams that send frames at `--fps` each until
the end; after `--warmup` seconds a window of `--seconds` opens, and everything is counted
inside it only (`stream_load.py`): frames sent, the server's own counts of frames received,
processed and dropped by reason, batch items and backend calls per model, backend seconds,
its CPU time, queue depths and RSS sampled every 0.5 s, and each result's latency.

`--real-models [DIR]` serves the real models (default ../shared/models) and streams the frames
of the shared video (short_hamilton_clip.mp4, 640x360). Right before and right after each
run, the models alone (`model_limit.measure`, both ways) run the same work on the same
frames: each frame letterboxed to the detector's 640x640 as the server does, the detector,
then the recognizer on that frame's faces found at the server's default threshold (0.6).
The ratio is the server's frames processed per second of window over the best way's models-
alone frames per second (mean of before and after); faces per frame and recognizer calls
per frame are printed for both sides, so a difference in work shows.

    python benchmarks/streams.py --real-models --streams 1,4,16 --fps 15 --warmup 3 \
        --seconds 10 --limit-seconds 4

Without `--real-models` the server gets generated test models (nothing is downloaded) and
the streams send synthetic 640x480 JPEGs; no models-alone limit is measured then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
from stream_load import measure

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
    real_models: Path | None,
    env_extra: dict[str, str],
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
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "json",
        **env_extra,
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


def spread(n: int) -> list[int]:
    """0..n-1 in an order that visits the whole clip early (a stride coprime to n near the
    golden section), so a models-alone measurement of a few seconds sees the clip's face mix,
    not only its first frames."""
    stride = max(1, round(n * 0.618))
    while math.gcd(stride, n) != 1:
        stride += 1
    return [(k * stride) % n for k in range(n)]


class ModelsAlone:
    """The models-alone side: the same frames through both models, both ways."""

    def __init__(self, models: Path, frames: list[bytes], seconds: float) -> None:
        from model_limit import prepare_many  # beside this script

        self.models = models
        self.seconds = seconds
        preps = prepare_many(models, frames)
        self.preps = [preps[i] for i in spread(len(preps))]
        self.cursor = 0  # each measurement goes on where the last one stopped

    @property
    def faces_per_frame(self) -> float:
        return sum(len(p.crops) for p in self.preps) / len(self.preps)

    def run(self) -> dict[str, Any]:
        from model_limit import measure as measure_models

        out = {}
        for way in WAYS:
            order = self.preps[self.cursor :] + self.preps[: self.cursor]
            r = measure_models(self.models, order, self.seconds, way == "per-core")
            self.cursor = (self.cursor + r.frames) % len(self.preps)
            out[way] = {
                "fps": r.fps,
                "cpu_ms_per_frame": r.cpu_ms_per_frame,
                "faces_per_frame": r.faces / max(r.frames, 1),
                "rec_calls_per_frame": r.rec_calls / max(r.frames, 1),
            }
        return out


def with_limit(run: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    """Add the models-alone figures around `run`: the best way by the mean of before and after."""
    mean = {w: (before[w]["fps"] + after[w]["fps"]) / 2 for w in WAYS}
    best = max(WAYS, key=lambda w: mean[w])
    run["limit_way"] = best
    run["limit_before_fps"] = before[best]["fps"]
    run["limit_after_fps"] = after[best]["fps"]
    run["limit_fps"] = mean[best]
    run["ratio"] = run["served_fps"] / mean[best]
    both = (before[best], after[best])
    run["limit_cpu_ms_per_frame"] = statistics.fmean(b["cpu_ms_per_frame"] for b in both)
    # Both ways' CPU cost: the server's default (one session per model on every core) is
    # the shared way, whose thread pool costs more CPU per frame than single-thread sessions.
    for way in WAYS:
        run[f"limit_cpu_ms_{way}"] = (
            before[way]["cpu_ms_per_frame"] + after[way]["cpu_ms_per_frame"]
        ) / 2
    run["limit_faces_per_frame"] = statistics.fmean(b["faces_per_frame"] for b in both)
    run["limit_rec_calls_per_frame"] = statistics.fmean(b["rec_calls_per_frame"] for b in both)
    run["limits"] = {"before": before, "after": after}


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    proc = None
    config = {"max_fps": args.fps, "extract_embedding": args.embeddings}
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url = args.url
            base = re.sub(r"^ws", "http", url).rsplit("/ws/stream", 1)[0]
        else:
            port = free_port()
            env = dict(kv.split("=", 1) for kv in args.env)
            det_batch = 1 if args.real_models else args.det_batch
            proc = start_server(
                Path(tmp),
                port,
                args.trunk_layers,
                args.trunk_channels,
                det_batch,
                args.real_models,
                env,
            )
            base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws/stream"
        try:
            await wait_ready(base, proc, 120)
            rows = []
            for n in args.streams:
                for _ in range(args.repeats):
                    # The limit right before and right after each run: on a shared machine
                    # the load moves between minutes, and a ratio must compare like with like.
                    before = args.alone.run() if args.alone else None
                    run = await measure(
                        url,
                        base,
                        proc.pid if proc else None,
                        n,
                        args.fps,
                        args.warmup,
                        args.seconds,
                        args.frames,
                        config,
                    )
                    if args.alone and before:
                        with_limit(run, before, args.alone.run())
                    rows.append(run)
                    print_run(run)
            return rows
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


def fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def print_run(r: dict[str, Any]) -> None:
    """One run as markdown rows (three tables: throughput, drops, costs)."""
    n = r["streams"]
    ratio = ""
    if "ratio" in r:
        cpu_ratio = r["limit_cpu_ms_per_frame"] / r["server_cpu_ms_per_frame"]
        ratio = (
            f" {fmt(r['limit_before_fps'], 2)} / {fmt(r['limit_after_fps'], 2)} "
            f"({r['limit_way']}) | **{fmt(r['ratio'], 2)}** | {fmt(cpu_ratio, 2)} |"
        )
    print(
        f"| {n} | {fmt(r['sent'] / r['window_s'])} | {fmt(r['served_fps'], 2)} | "
        f"{fmt(r['results_fps'], 2)} | {fmt(100 * r['det_busy_s'] / r['window_s'], 0)} % |"
        f"{ratio}",
        flush=True,
    )
    print(
        f"  drops | {n} | {r['sent']} | {r['settled']:.0f} | {r['processed']:.0f} | "
        f"{r['dropped_replaced']:.0f} | {r['dropped_over_fps']:.0f} | {r['dropped_busy']:.0f} | "
        f"{r['bad']:.0f} | {r['results_dropped']:.0f} | {r['errors']} |",
        flush=True,
    )
    f_alone = c_alone = cpu_alone = ""
    if "ratio" in r:
        f_alone = f" / {fmt(r['limit_faces_per_frame'], 2)}"
        c_alone = f" / {fmt(r['limit_rec_calls_per_frame'], 2)}"
        cpu_alone = "".join(f" / {fmt(r[f'limit_cpu_ms_{w}'], 0)}" for w in WAYS)
    print(
        f"  work | {n} | {fmt(r['faces_per_frame'], 2)}{f_alone} | "
        f"{fmt(r['rec_calls'] / r['processed'] if r['processed'] else None, 2)}{c_alone} | "
        f"{fmt(r['latency_p50_ms'], 0)} / {fmt(r['latency_p90_ms'], 0)} / "
        f"{fmt(r['latency_p99_ms'], 0)} | {fmt(r['stream_p50_min_ms'], 0)}-"
        f"{fmt(r['stream_p50_max_ms'], 0)} ({r['streams_served']}/{n}) | "
        f"{fmt(r['det_queue_peak'], 0)} / {fmt(r['det_queue_mean'])} / "
        f"{fmt(r['rec_queue_peak'], 0)} | {fmt(r['in_analysis_peak'], 0)} / "
        f"{fmt(r['frame_slots'], 0)} | {fmt(r['rss_peak_mb'], 0)} "
        f"({fmt(r['rss_first_tenth_mb'], 0)} -> {fmt(r['rss_last_tenth_mb'], 0)}) | "
        f"{fmt(r['server_cpu_ms_per_frame'], 0)}{cpu_alone} | {fmt(r['server_cores'], 2)} | "
        f"{fmt(r['client_cores'], 2)} |",
        flush=True,
    )


HEADERS = (
    "columns, per run:\n"
    "| streams | sent fps | served fps (server count) | results fps (client count) | "
    "detector busy | models alone fps before / after (way) | ratio | CPU ratio |\n"
    "  drops | streams | frames sent | settled (processed + dropped + bad) | processed | replaced (in flight) | "
    "replaced (fps cap) | busy (queue full) | bad | results dropped | error messages |\n"
    "  work | streams | faces per frame served / alone | recognizer calls per frame served / "
    "alone | latency p50 / p90 / p99 ms | per-stream p50 min-max ms (streams served) | "
    "detector queue peak / mean, recognizer queue peak | stream frames in analysis peak / "
    "slots | RSS peak MB (first -> last tenth) | "
    "CPU ms per frame server / models alone shared / per-core | server cores | client cores |"
)


def main() -> None:
    if sys.argv[1:] == ["--serve-child"]:
        serve_child()
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", help="ws://HOST:PORT/ws/stream of a running appliance")
    parser.add_argument(
        "--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16]
    )
    parser.add_argument("--fps", type=float, default=15.0, help="frames per second per stream")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the window")
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    parser.add_argument("--repeats", type=int, default=1, help="runs per stream count")
    parser.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--trunk-layers", type=int, default=2, help="test detector's cost")
    parser.add_argument("--trunk-channels", type=int, default=16)
    parser.add_argument("--det-batch", type=int, default=8, help="test models only")
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the server (repeatable)"
    )
    parser.add_argument("--json-out", type=Path, help="also write the runs as JSON here")
    parser.add_argument(
        "--real-models",
        type=Path,
        nargs="?",
        const=SHARED / "models",
        help="serve the real models and stream the shared video (default: ../shared/models)",
    )
    parser.add_argument("--video-frames", type=int, default=90, help="frames of the video used")
    parser.add_argument(
        "--limit-seconds", type=float, default=4.0, help="each models-alone measurement"
    )
    args = parser.parse_args()
    print(
        f"# {platform.node()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    args.alone = None
    if args.real_models:
        args.frames = video_frames(SHARED / "photos" / VIDEO, args.video_frames)
        args.alone = ModelsAlone(args.real_models, args.frames, args.limit_seconds)
        print(
            f"# {len(args.frames)} frames of {VIDEO}, {args.alone.faces_per_frame:.2f} faces "
            f"per frame; models alone {args.limit_seconds:g} s per way, before and after each run"
        )
    else:
        args.frames = make_frames(8, seed=1)
    print(
        f"# {args.fps:g} fps asked per stream, {args.warmup:g} s warm-up, {args.seconds:g} s "
        f"window\n{HEADERS}",
        flush=True,
    )
    rows = asyncio.run(bench(args))
    if args.json_out:
        keep = {k: v for k, v in vars(args).items() if k not in ("frames", "alone")}
        args.json_out.write_text(json.dumps({"args": keep, "runs": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
