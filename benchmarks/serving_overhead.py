"""What does serving cost? The same detector, image and batch size measured two ways:

(a) a bare loop calling the backend on ready-made batches (the model's own throughput), and
(b) end to end: `POST /extract` on a real socket against `appliance serve` running in its own
    process, at several client concurrencies.

It prints medians, p99 and the throughput ratio (b)/(a) per concurrency. Run with
`python benchmarks/serving_overhead.py` (see --help); results go in docs/BENCHMARKS.md.
`--real-models [DIR]` measures the real models (SCRFD-2.5G + MobileFaceNet, default
../shared/models) instead, in one run: the models-alone limit both ways (`model_limit.py`),
`/extract` with embeddings and landmarks at each concurrency for the 6-face t1.jpg and the
single-face probe/obama1.jpg, JSON and msgpack, the ratio to the best limit, the server's CPU
milliseconds and RSS per request, and the CPU milliseconds of each stage.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, benchmarks/ is on the path, not the repo

from appliance.backends.ort import OnnxRuntimeBackend  # noqa: E402
from appliance.models.demo import PlantedFace, build_arcface_model, build_scrfd_model  # noqa: E402
from appliance.models.registry import ModelInfo, ModelRegistry  # noqa: E402
from appliance.pipeline.embed import to_blob  # noqa: E402
from appliance.pipeline.images import letterbox  # noqa: E402
from tests.serve_process import ServedProcess, appliance_serve  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def make_image(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth content compresses like a photo; pure noise would make JPEG decoding the bottleneck.
    small = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    img = cv2.resize(small, (640, 480), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return bytes(buf.tobytes())


SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_DETECTOR = "scrfd_2.5g_bnkps"
REAL_RECOGNIZER = "mobilefacenet_128"


def write_models(directory: Path, layers: int, channels: int) -> None:
    faces = [PlantedFace.square(100, 120, 80), PlantedFace.square(300, 200, 150)]
    build_scrfd_model(directory / "det.onnx", faces, trunk_layers=layers, trunk_channels=channels)
    build_arcface_model(directory / "rec.onnx")
    override = {
        "bench_scrfd": {"family": "scrfd", "file": "det.onnx"},
        "bench_arcface": {"family": "arcface", "file": "rec.onnx"},
    }
    (directory / "models.override.json").write_text(json.dumps(override))


def detector(directory: Path, real: bool) -> tuple[ModelInfo, Path]:
    if real:
        info = ModelRegistry.load().get(REAL_DETECTOR)
        return info, directory / info.file
    return ModelRegistry.load(directory / "models.override.json").get("bench_scrfd"), (
        directory / "det.onnx"
    )


def bare_loop(
    directory: Path, image: bytes, batch: int, seconds: float, real: bool = False
) -> dict[str, float]:
    info, path = detector(directory, real)
    backend = OnnxRuntimeBackend(path, info, max_batch=batch, image_shape=(3, 640, 640))
    img = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    canvas, _ = letterbox(img, (640, 640))
    blob = np.repeat(to_blob(canvas, info.default_preprocess), batch, axis=0)
    backend.infer(blob)  # warm-up: first run allocates
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        backend.infer(blob)
        times.append(time.perf_counter() - t)
    backend.close()
    return {
        "batch_ms_p50": statistics.median(times) * 1e3,
        "batch_ms_p99": percentile(times, 99) * 1e3,
        "images_per_s": batch * len(times) / sum(times),
    }


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def extract_payload(image: bytes, use_msgpack: bool) -> tuple[bytes, str]:
    """/extract with embeddings and landmarks, as a JSON or a msgpack client sends it."""
    if use_msgpack:
        body = {"images": {"data": [image]}, "return_landmarks": True, "msgpack": True}
        return bytes(msgpack.packb(body, use_bin_type=True)), "application/msgpack"
    body = {"images": {"data": [base64.b64encode(image).decode()]}, "return_landmarks": True}
    return json.dumps(body).encode(), "application/json"


async def load(
    url: str,
    image: bytes,
    concurrency: int,
    seconds: float,
    request: tuple[bytes, str] | None = None,
    pid: int | None = None,
) -> dict[str, float]:
    payload, ctype = request or (
        json.dumps(
            {"images": {"data": [base64.b64encode(image).decode()]}, "extract_embedding": False}
        ).encode(),
        "application/json",
    )
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession() as session:
        # Warm-up so that model first-run costs are not counted.
        async with session.post(url, data=payload, headers={"Content-Type": ctype}) as r:
            await r.read()
        cpu_before = proc_cpu_s(pid) if pid else 0.0
        end = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                async with session.post(url, data=payload, headers={"Content-Type": ctype}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        continue
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu = proc_cpu_s(pid) - cpu_before if pid else float("nan")
    return {
        "latency_ms_p50": statistics.median(latencies) * 1e3,
        "latency_ms_p99": percentile(latencies, 99) * 1e3,
        "images_per_s": len(latencies) / elapsed,
        "errors": float(errors),
        "server_cpu_ms_per_request": cpu * 1e3 / max(len(latencies), 1),
        "server_rss_mb": proc_rss_mb(pid) if pid else float("nan"),
    }


@contextlib.contextmanager
def serving(
    directory: Path,
    batch: int,
    window_ms: float,
    log_dir: Path,
    real: bool = False,
    extra_env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[ServedProcess]:
    env = {
        "MODELS_DIR": str(directory),
        "DET_MODEL": REAL_DETECTOR if real else "bench_scrfd",
        "REC_MODEL": REAL_RECOGNIZER if real else "bench_arcface",
        "TRUST_UNVERIFIED": "1",
        "DET_BATCH_SIZE": str(batch),
        "BATCH_WINDOW_MS": str(window_ms),
        "MAX_QUEUE": "256",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "json",
        **(extra_env or {}),
    }
    # The watchdog reads the harness's calm sysfs tree, so a busy host cannot pause a round;
    # `--env TELEMETRY_SOURCE=auto` measures with the host's own telemetry instead.
    with appliance_serve("--no-fetch", env=env, log_dir=log_dir, cwd=cwd) as server:
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=5, help="test detector trunk depth (cost)")
    parser.add_argument("--channels", type=int, default=32, help="test detector trunk width (cost)")
    parser.add_argument("--batch", type=int, default=1, help="DET_BATCH_SIZE for both measurements")
    parser.add_argument("--window-ms", type=float, default=2.0)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; medians are reported"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--real-models",
        type=Path,
        nargs="?",
        const=SHARED / "models",
        help=f"directory with {REAL_DETECTOR}.onnx and {REAL_RECOGNIZER}.onnx "
        "(default with no value: ../shared/models); --layers/--channels are then ignored",
    )
    parser.add_argument(
        "--image", type=Path, help="JPEG to send (default: generated, or t1.jpg with real models)"
    )
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the server (repeatable)"
    )
    parser.add_argument(
        "--compare-src",
        type=Path,
        help="with --real-models: also serve the code of this checkout (e.g. a worktree of "
        "main) and measure it in the same rounds",
    )
    parser.add_argument(
        "--compare-env",
        action="append",
        default=[],
        help="KEY=VALUE for a second server of this checkout (or of --compare-src), measured "
        "in the same rounds: one setting against another",
    )
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    real = args.real_models is not None
    if real:
        from real_serving import run_real  # beside this script

        run_real(args, concurrencies)
        return
    if args.image is not None:
        image = args.image.read_bytes()
    elif real:
        image = (SHARED / "photos" / "t1.jpg").read_bytes()
    else:
        image = make_image()

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.real_models if real else Path(tmp)
        if not real:
            write_models(directory, args.layers, args.channels)
        bare_runs: list[dict[str, float]] = []
        served_runs: dict[int, list[dict[str, float]]] = {c: [] for c in concurrencies}
        with serving(directory, args.batch, args.window_ms, Path(tmp), real) as server:
            url = f"{server.base}/extract"
            # Alternate (a) and (b) so that machine noise hits both alike. The server idles
            # while the bare loop runs, and vice versa.
            for _ in range(args.rounds):
                bare_runs.append(bare_loop(directory, image, args.batch, args.seconds, real))
                for c in concurrencies:
                    served_runs[c].append(asyncio.run(load(url, image, c, args.seconds)))

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    bare_tput = med(bare_runs, "images_per_s")
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "model": (
            f"real {REAL_DETECTOR}, 640x640"
            if real
            else f"generated SCRFD-signature detector, trunk {args.layers}x{args.channels}, 640x640"
        ),
        "batch": args.batch,
        "bare": {
            "batch_ms_p50": med(bare_runs, "batch_ms_p50"),
            "batch_ms_p99": med(bare_runs, "batch_ms_p99"),
            "images_per_s": bare_tput,
        },
        "served": {},
    }
    print(
        f"{result['machine']}; {result['model']}; batch {args.batch}; {args.rounds} rounds x {args.seconds}s"
    )
    print(
        f"(a) bare backend: {bare_tput:7.2f} img/s, batch p50 {result['bare']['batch_ms_p50']:.1f} ms, p99 {result['bare']['batch_ms_p99']:.1f} ms"
    )
    for c in concurrencies:
        runs = served_runs[c]
        tput = med(runs, "images_per_s")
        row = {
            "images_per_s": tput,
            "latency_ms_p50": med(runs, "latency_ms_p50"),
            "latency_ms_p99": med(runs, "latency_ms_p99"),
            "errors": sum(r["errors"] for r in runs),
            "ratio": tput / bare_tput,
        }
        result["served"][c] = row
        print(
            f"(b) /extract c={c:<3d}: {tput:7.2f} img/s, latency p50 {row['latency_ms_p50']:.1f} ms, "
            f"p99 {row['latency_ms_p99']:.1f} ms, errors {row['errors']:.0f}, ratio (b)/(a) {row['ratio']:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
