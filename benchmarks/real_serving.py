"""`serving_overhead.py --real-models`: the models-alone limit and `/extract` in one run.

Each round measures, for each photo, the two models-alone limits (`model_limit.limit`) while
the server idles, then `/extract` at every concurrency in JSON and msgpack. Medians over the
rounds are printed with the ratio to the best limit of the same photo, and the server's CPU
milliseconds per request next to the single-thread CPU cost of each stage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from model_limit import SHARED, limit, prepare, stage_cpu_ms
from serving_overhead import extract_payload, load, serving

from tests.serve_process import ServedProcess

PHOTOS = {"t1 (6 faces)": "t1.jpg", "obama1 (1 face)": "probe/obama1.jpg"}
MODEL_STAGES = ("detector model", "recognizer model")


def run_real(args: argparse.Namespace, concurrencies: list[int]) -> None:
    models = args.real_models
    env = dict(kv.split("=", 1) for kv in args.env)
    preps = {
        name: prepare(models, (SHARED / "photos" / f).read_bytes()) for name, f in PHOTOS.items()
    }
    limits: dict[tuple[str, str], list[float]] = defaultdict(list)
    served: dict[tuple[str, str, str, int], list[dict[str, float]]] = defaultdict(list)
    compare_env = dict(kv.split("=", 1) for kv in args.compare_env)
    sources: dict[str, Path | None] = {"this": None}
    if args.compare_src or compare_env:
        sources["compare"] = args.compare_src
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as stack:
        servers: dict[str, ServedProcess] = {}
        for label, src in sources.items():
            # --compare-src: the same benchmark against another checkout's code (main, say),
            # started from that directory, so before and after meet the same machine load.
            extra = {**env, **(compare_env if label == "compare" else {})}
            if src:
                extra["PYTHONPATH"] = str(src)
            servers[label] = stack.enter_context(
                serving(models, args.batch, args.window_ms, Path(logs), True, extra, src)
            )
        for _ in range(args.rounds):
            for name, prep in preps.items():
                for way in ("shared", "per-core"):
                    limits[(name, way)].append(
                        limit(models, prep, args.seconds, per_core=way == "per-core")
                    )
                for fmt in ("json", "msgpack"):
                    request = extract_payload(prep.data, fmt == "msgpack")
                    for c in concurrencies:
                        for label, server in servers.items():
                            url, pid = f"{server.base}/extract", server.proc.pid
                            run = load(url, prep.data, c, args.seconds, request, pid)
                            served[(label, name, fmt, c)].append(asyncio.run(run))

    result: dict[str, Any] = {"env": env, "limits": {}, "served": [], "stages": {}}
    print(f"server env {env or '(defaults)'}; {args.rounds} rounds x {args.seconds}s; medians")
    if "compare" in sources:
        print(f"compare: source {args.compare_src or 'this checkout'}, env {compare_env or '-'}")
    best: dict[str, float] = {}
    for name in preps:
        shared = statistics.median(limits[(name, "shared")])
        per_core = statistics.median(limits[(name, "per-core")])
        best[name] = max(shared, per_core)
        result["limits"][name] = {"shared": shared, "per_core": per_core}
        print(f"models alone, {name}: shared {shared:.2f}/s, per-core {per_core:.2f}/s")
    print(
        "server | photo | format | c | req/s | ratio to best limit | p50 / p99 ms | "
        "server CPU ms/req | RSS MB | errors"
    )
    for (label, name, fmt, c), runs in served.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        errors = sum(r["errors"] for r in runs)
        ratio = med["images_per_s"] / best[name]
        result["served"].append(
            {"server": label, "photo": name, "format": fmt, "c": c, "ratio": ratio, **med}
        )
        print(
            f"{label} | {name} | {fmt} | {c} | {med['images_per_s']:.2f} | {ratio:.2f} | "
            f"{med['latency_ms_p50']:.0f} / {med['latency_ms_p99']:.0f} | "
            f"{med['server_cpu_ms_per_request']:.1f} | {med['server_rss_mb']:.0f} | {errors:.0f}"
        )
    for name, prep in preps.items():
        for fmt in ("json", "msgpack"):
            stages = stage_cpu_ms(models, prep, 20, fmt == "msgpack")
            result["stages"][f"{name} {fmt}"] = stages
            models_ms = sum(stages[s] for s in MODEL_STAGES)
            print(f"CPU ms by stage, {name}, {fmt} (one thread, median of 20):")
            for stage, ms in stages.items():
                print(f"  {stage:32s} {ms:7.2f}")
            print(f"  {'outside the models':32s} {sum(stages.values()) - models_ms:7.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
