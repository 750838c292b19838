"""What identification adds to a request, through the real server on loopback.

With the real models of ../shared (SCRFD-2.5G, MobileFaceNet-128) and a gallery of the shared
photos plus N synthetic subjects (bulk-enrolled by embeddings over HTTP), it measures:

- `/extract` vs `/extract` with `"identify": true` vs `/gallery/search` on one probe photo
  (medians; the ratio is the cost of the search, JSON included);
- bulk enrolment over HTTP with embeddings: faces per second, 1,000 faces per call;
- verification of an image against a subject.

Run `python benchmarks/gallery_http.py --help`; results in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.api.app import create_app  # noqa: E402
from tests.gallery_fixtures import PHOTOS, real_settings  # noqa: E402
from tests.helpers import write_calm_sysfs  # noqa: E402


async def interleaved(
    session: aiohttp.ClientSession, calls: dict[str, tuple[str, Any]], repeat: int
) -> dict[str, float]:
    """Median ms per call. The calls take turns in a new random order each round: on a
    shared host the position in a round alone moved medians by up to 30 %."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    shuffle = random.Random(5).shuffle
    for i in range(repeat + 1):
        shuffle(order)
        for name in order:
            url, body = calls[name]
            start = time.perf_counter()
            async with session.post(url, json=body) as resp:
                await resp.read()
                assert resp.status == 200, await resp.text()
            if i:  # the first round is a warm-up
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # A calm sysfs tree: the watchdog must not pause the run on a busy host.
        sysfs = write_calm_sysfs(Path(tmp) / "sysfs")
        settings = real_settings(Path(tmp), telemetry_source="sysfs", sysfs_root=sysfs)
        runner = web.AppRunner(create_app(settings))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        rng = np.random.default_rng(1)
        try:
            async with aiohttp.ClientSession() as session:
                for folder in sorted((PHOTOS / "gallery").iterdir()):
                    images = [base64.b64encode(p.read_bytes()).decode() for p in folder.iterdir()]
                    await session.post(
                        f"{base}/gallery/bulk",
                        json={"subjects": [{"subject": folder.name, "images": images}]},
                    )
                bulk_times = []
                for start in range(0, args.subjects, 1000):
                    vecs = rng.standard_normal((min(1000, args.subjects - start), 128))
                    body = {
                        "subjects": [
                            {"subject": f"synthetic-{start + i}", "embeddings": [v.tolist()]}
                            for i, v in enumerate(vecs)
                        ]
                    }
                    t0 = time.perf_counter()
                    async with session.post(f"{base}/gallery/bulk", json=body) as resp:
                        assert resp.status == 201, await resp.text()
                    bulk_times.append(len(vecs) / (time.perf_counter() - t0))
                probe = base64.b64encode((PHOTOS / "probe" / "two_people.jpg").read_bytes())
                image = {"images": {"data": [probe.decode()]}}
                got = interleaved(
                    session,
                    {
                        "extract": (f"{base}/extract", image),
                        "search": (f"{base}/gallery/search", image),
                        "identify": (f"{base}/extract", {**image, "identify": True}),
                        "verify": (f"{base}/gallery/verify", {**image, "subject": "obama"}),
                    },
                    args.repeat,
                )
                ms = await got
        finally:
            await runner.cleanup()
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print(f"gallery: 5 photo faces + {args.subjects} synthetic subjects (128-d)")
    print(f"bulk enrolment by embeddings: median {statistics.median(bulk_times):.0f} faces/s")
    extract = ms["extract"]
    print(f"/extract two_people.jpg (2 faces): median {extract:.1f} ms")
    for name in ("identify", "search", "verify"):
        print(f"{name}: median {ms[name]:.1f} ms (x{ms[name] / extract:.3f} of /extract)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    asyncio.run(main(parser.parse_args()))
