"""Gallery search, load and enrolment, measured.

- exact: one query against N faces (ExactIndex, BLAS GEMV) and through Gallery.identify,
  plus a batch of 16 queries per call (one GEMM) reported per query;
- ann: ApproximateIndex (FAISS binary codes + exact re-rank) over N faces: build time,
  search median and recall@1 against exact search;
- load: open a Gallery whose SQLite file holds N subjects of one face (start-up cost);
- enrol: photos -> real pipeline -> Gallery.add_faces, faces per second (real models of
  ../shared; batch 1 as the real MobileFaceNet requires).

Synthetic embeddings are random unit vectors; each query is a stored face plus noise that
leaves a cosine near 0.7 to it (a genuine match), so recall@1 asks whether the index finds
the one right face. Random vectors are the hardest case for a graph index (no clusters to
follow). Run `python benchmarks/gallery_search.py --help`; results in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.gallery import BulkSubject, Gallery, NewFace, Recognizer  # noqa: E402
from appliance.gallery.index import ApproximateIndex, ExactIndex  # noqa: E402

REC = Recognizer("bench", "0" * 64)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray[Any, Any]:
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # chunks keep the float64 temporaries small
        block = rng.standard_normal((min(100_000, n - start), dim), np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def queries_near(
    rng: np.random.Generator, data: np.ndarray[Any, Any], m: int
) -> np.ndarray[Any, Any]:
    picks = data[rng.integers(0, len(data), m)]
    noisy = picks + rng.standard_normal(picks.shape, np.float32) * (1.0 / np.sqrt(data.shape[1]))
    return np.asarray(noisy / np.linalg.norm(noisy, axis=1, keepdims=True), np.float32)


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_exact(n: int, dim: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    data = unit_rows(rng, n, dim)
    q = queries_near(rng, data, 64)
    index = ExactIndex(dim, capacity=n)
    index.add(np.arange(n, dtype=np.int64), data)
    it = iter(range(10**9))
    one = median_ms(lambda: index.search(q[next(it) % 64][None], 5), repeat)
    batch = median_ms(lambda: index.search(q[:16], 5), max(3, repeat // 4)) / 16
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery(Path(tmp) / "g.db", REC, ann_min_faces=0)
        gallery.enrol_bulk(
            [BulkSubject(f"s{i}", (NewFace(data[i]),)) for i in range(n)], create=True
        )
        ident = median_ms(lambda: gallery.identify(q[next(it) % 64], top_k=5), repeat)
        gallery.close()
    print(
        f"exact n={n} dim={dim}: index search {one:.2f} ms/query (1 query), "
        f"{batch:.2f} ms/query (16 per call); Gallery.identify top_k=5 {ident:.2f} ms"
    )


def bench_ann(n: int, dim: int, queries: int) -> None:
    rng = np.random.default_rng(1)
    data = unit_rows(rng, n, dim)
    q = queries_near(rng, data, queries)
    truth = np.concatenate(
        [np.argmax(q[i : i + 50] @ data.T, axis=1) for i in range(0, queries, 50)]
    )
    index = ApproximateIndex(dim)
    t = time.perf_counter()
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        index.add(np.arange(start, stop, dtype=np.int64), data[start:stop])
    build = time.perf_counter() - t
    del data  # the index holds float16 copies; free the float32 originals
    times, hits = [], 0
    for i in range(queries):
        t = time.perf_counter()
        _, ids = index.search(q[i][None], 1)
        times.append(time.perf_counter() - t)
        hits += int(ids[0, 0] == truth[i])
    print(
        f"ann n={n} dim={dim} (binary codes + re-rank {ApproximateIndex.RERANK}): build "
        f"{build:.1f} s, search median {statistics.median(times) * 1e3:.2f} ms "
        f"(p90 {np.percentile(times, 90) * 1e3:.2f}), recall@1 vs exact {hits / queries:.3f}"
    )


def bench_load(n: int, dim: int, repeat: int) -> None:
    rng = np.random.default_rng(2)
    data = unit_rows(rng, n, dim)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.db"
        g = Gallery(path, REC, ann_min_faces=0)
        t = time.perf_counter()
        g.enrol_bulk([BulkSubject(f"s{i}", (NewFace(data[i]),)) for i in range(n)], create=True)
        write = time.perf_counter() - t
        g.close()
        size = path.stat().st_size / 2**20

        def open_close() -> None:
            Gallery(path, REC, ann_min_faces=0).close()

        load = median_ms(open_close, repeat)
    print(
        f"load n={n} dim={dim}: open (read + index) {load / 1e3:.2f} s median of {repeat}; "
        f"file {size:.0f} MiB; bulk write of all {write:.1f} s"
    )


async def bench_enrol(rounds: int) -> None:
    import cv2

    from appliance.commands.local_pipeline import open_pipeline
    from appliance.gallery.enrol import enrolment_face
    from tests.gallery_fixtures import PHOTOS, real_settings

    photos = sorted((PHOTOS / "gallery").rglob("*.jpg"))
    images = [(p.parent.name, cv2.imread(str(p))) for p in photos]
    with tempfile.TemporaryDirectory() as tmp:
        settings = real_settings(Path(tmp))
        async with open_pipeline(settings) as pipe:
            gallery = Gallery(Path(tmp) / "g.db", pipe.recognizer)
            per_round = []
            for r in range(rounds):
                t = time.perf_counter()
                for subject, img in images:
                    face = await enrolment_face(pipe.analyzer, img, 0.5)
                    assert face is not None
                    gallery.add_faces(f"{subject}-{r}", [face], create=True)
                per_round.append(len(images) / (time.perf_counter() - t))
            # Concurrent enrolments share the batchers as API requests would.
            t = time.perf_counter()
            faces = await asyncio.gather(
                *(enrolment_face(pipe.analyzer, img, 0.5) for _, img in images * 4)
            )
            gallery.enrol_bulk(
                [BulkSubject(f"bulk-{i}", (f,)) for i, f in enumerate(faces) if f is not None]
            )
            concurrent = len(faces) / (time.perf_counter() - t)
    print(
        f"enrol (real SCRFD-2.5G + MobileFaceNet, batch 1, {len(images)} photos of "
        f"{images[0][1].shape[1]}x{images[0][1].shape[0]}..): sequential "
        f"{statistics.median(per_round):.1f} faces/s median of {rounds} rounds; "
        f"{len(faces)} concurrent + one bulk commit {concurrent:.1f} faces/s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", nargs="*", default=["exact", "load", "enrol", "ann"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--exact-n", type=int, default=100_000)
    p.add_argument("--ann-n", type=int, default=1_000_000)
    p.add_argument("--load-n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--repeat", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(
        f"# {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}"
    )
    if "exact" in args.what:
        bench_exact(args.exact_n, args.dim, args.repeat)
    if "load" in args.what:
        bench_load(args.load_n, args.dim, 3)
    if "enrol" in args.what:
        asyncio.run(bench_enrol(args.rounds))
    if "ann" in args.what:
        bench_ann(args.ann_n, args.dim, args.queries)


if __name__ == "__main__":
    main()
