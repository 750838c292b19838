"""The models-alone limit on the real models, two ways, and the CPU cost of each serving stage.

Models alone: the detector on a ready letterboxed canvas and the recognizer on the photo's
ready aligned crops, in a loop, as fast as they go; no decoding, no HTTP.
  shared   one pipeline on sessions whose intra-op threads use every core
  per-core one pipeline per core, each on single-thread sessions (threads; ORT frees the GIL)
Stages: one thread runs decode, letterbox, detector, output decoding, alignment, recognizer
and response encoding, timing each with the thread's CPU clock (`time.thread_time`).

Used by `serving_overhead.py --real-models`; alone: `python benchmarks/model_limit.py`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from appliance.backends.ort import OnnxRuntimeBackend
from appliance.models.loader import input_rewrite
from appliance.models.registry import ModelRegistry
from appliance.pipeline import align, embed
from appliance.pipeline.detect import decode_scrfd
from appliance.pipeline.images import ImageDecoder, letterbox

SHARED = Path(__file__).resolve().parents[2] / "shared"
DETECTOR = "scrfd_2.5g_bnkps"
RECOGNIZER = "mobilefacenet_128"
SIZE = (640, 640)


@dataclasses.dataclass
class Prepared:
    """One photo's model inputs, ready: the detector canvas and the aligned crops."""

    data: bytes
    canvas: np.ndarray
    crops: np.ndarray


class Pipeline:
    """Both real models as the appliance loads them (uint8 input rewrite)."""

    def __init__(self, models: Path, intra_op_threads: int, max_faces: int) -> None:
        registry = ModelRegistry.load(models / "none.json")
        det_info, rec_info = registry.get(DETECTOR), registry.get(RECOGNIZER)
        self.det_info = det_info
        self.det = OnnxRuntimeBackend(
            models / det_info.file,
            det_info,
            max_batch=1,
            intra_op_threads=intra_op_threads,
            image_shape=(3, SIZE[1], SIZE[0]),
            input_rewrite=input_rewrite(det_info, False),
        )
        self.rec = OnnxRuntimeBackend(
            models / rec_info.file,
            rec_info,
            max_batch=max(1, max_faces),
            intra_op_threads=intra_op_threads,
            image_shape=(3, 112, 112),
            input_rewrite=input_rewrite(rec_info, False),
        )

    def outputs(self, raw: dict[str, np.ndarray]) -> list[np.ndarray]:
        values = [raw[o.name][0] for o in self.det.outputs]
        order = self.det_info.output_order
        return values if order is None else [values[i] for i in order]

    def run(self, prep: Prepared) -> int:
        """Both models on one frame, as the appliance runs them; returns recognizer calls."""
        self.det.infer(prep.canvas[None])
        if len(prep.crops):
            self.rec.infer(prep.crops)
            return 1
        return 0

    def close(self) -> None:
        self.det.close()
        self.rec.close()


def prepare(models: Path, data: bytes) -> Prepared:
    return prepare_many(models, [data])[0]


def prepare_many(models: Path, images: list[bytes]) -> list[Prepared]:
    """Each image's detector canvas and aligned crops, found by the real detector at the
    appliance's default threshold (0.6); one pipeline for all (loading one costs seconds)."""
    decoder = ImageDecoder.create(100_000_000)
    pipe = Pipeline(models, 1, 1)
    out = []
    for data in images:
        img = decoder.decode(data)
        canvas, scale = letterbox(img, SIZE)
        found = decode_scrfd(pipe.outputs(pipe.det.infer(canvas[None])), SIZE, 0.6, scale)
        points = [d.landmarks for d in found if d.landmarks is not None]
        landmarks = np.stack(points) if points else np.empty((0, 5, 2), np.float32)
        out.append(Prepared(data, canvas, align.align_faces(img, landmarks)))
    pipe.close()
    return out


@dataclasses.dataclass(frozen=True)
class LimitRun:
    """One models-alone measurement: what was run, for how long, at what CPU cost."""

    way: str  # "shared" or "per-core"
    frames: int
    seconds: float
    cpu_s: float  # this process's user + system time over the loop (all its threads)
    faces: int  # crops through the recognizer
    rec_calls: int

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    @property
    def cpu_ms_per_frame(self) -> float:
        return self.cpu_s * 1e3 / max(self.frames, 1)


def measure(models: Path, preps: list[Prepared], seconds: float, per_core: bool) -> LimitRun:
    """Frames per second through both models, `per_core` or one shared pipeline, cycling
    through `preps` (a photo, or the frames of a video)."""
    most = max(len(p.crops) for p in preps)
    cores = os.cpu_count() or 1
    count = cores if per_core else 1
    pipes = [Pipeline(models, 1 if per_core else cores, most) for _ in range(count)]
    for pipe in pipes:
        pipe.run(preps[0])  # first runs allocate
    done = [0] * count
    faces = [0] * count
    calls = [0] * count
    end = time.perf_counter() + seconds

    def loop(i: int) -> None:
        # Each pipeline starts at its own frame so that parallel ones do not run in step.
        k = i * len(preps) // count
        while time.perf_counter() < end:
            prep = preps[k % len(preps)]
            calls[i] += pipes[i].run(prep)
            faces[i] += len(prep.crops)
            done[i] += 1
            k += 1

    cpu0, start = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    for pipe in pipes:
        pipe.close()
    way = "per-core" if per_core else "shared"
    return LimitRun(way, sum(done), elapsed, cpu, sum(faces), sum(calls))


def limit(models: Path, prep: Prepared | list[Prepared], seconds: float, per_core: bool) -> float:
    """Images per second through both models (`measure`); a single photo or a list."""
    return measure(models, prep if isinstance(prep, list) else [prep], seconds, per_core).fps


def response(faces: int, vecs: np.ndarray, use_msgpack: bool) -> bytes:
    """A response shaped like /extract's, encoded the way the API encodes it."""
    payload: dict[str, Any] = {
        "took": {"total_ms": 1.0},
        "data": [
            {
                "status": "ok",
                "took_ms": 1.0,
                "faces": [
                    {
                        "num_det": i,
                        "prob": 0.9,
                        "bbox": [1, 2, 3, 4],
                        "size": 2,
                        "landmarks": [[1.0, 2.0]] * 5,
                        "norm": 20.0,
                        "vec": vecs[i].tolist(),
                        "facedata": None,
                    }
                    for i in range(faces)
                ],
            }
        ],
    }
    if use_msgpack:
        return bytes(msgpack.packb(payload, use_bin_type=True))
    return json.dumps(payload).encode()


def stage_cpu_ms(models: Path, prep: Prepared, repeat: int, use_msgpack: bool) -> dict[str, float]:
    """Median CPU milliseconds of each stage for one request of this photo, on one thread."""
    pipe = Pipeline(models, 1, len(prep.crops))
    decoder = ImageDecoder.create(100_000_000)
    body = base64.b64encode(prep.data).decode()
    times: dict[str, list[float]] = {}

    def timed(stage: str, fn: Any, *args: Any) -> Any:
        t0 = time.thread_time()
        out = fn(*args)
        times.setdefault(stage, []).append((time.thread_time() - t0) * 1e3)
        return out

    for _ in range(repeat):
        raw = timed("request decode (base64/msgpack)", base64.b64decode, body)
        img = timed("image decode", decoder.decode, raw)
        canvas, scale = timed("letterbox", letterbox, img, SIZE)
        out = timed("detector model", pipe.det.infer, canvas[None])
        found = timed("detector outputs", decode_scrfd, pipe.outputs(out), SIZE, 0.6, scale)
        points = np.stack([d.landmarks for d in found if d.landmarks is not None])
        crops = timed("alignment", align.align_faces, img, points)
        emb = timed("recognizer model", pipe.rec.infer, crops)
        vecs, _ = timed("normalise", embed.normalize, next(iter(emb.values())))
        timed("response encode", response, len(found), vecs, use_msgpack)
    pipe.close()
    return {stage: statistics.median(values) for stage, values in times.items()}


def main() -> None:
    models = SHARED / "models"
    for name in ("t1.jpg", "probe/obama1.jpg"):
        prep = prepare(models, (SHARED / "photos" / name).read_bytes())
        shared = limit(models, prep, 5, per_core=False)
        per_core = limit(models, prep, 5, per_core=True)
        print(f"{name}: {len(prep.crops)} faces; shared {shared:.2f}/s, per-core {per_core:.2f}/s")
        for stage, ms in stage_cpu_ms(models, prep, 20, False).items():
            print(f"  {stage:32s} {ms:7.2f} ms")


if __name__ == "__main__":
    main()
