"""Per-face cost of turning pipeline results into response bytes, before and after the wire
types.

*before*: the previous `api/schemas.face_to_dict` (one Python `round()` per embedding element,
a dict per face) then `json.dumps` (what `web.json_response` does) or `msgpack.packb`;
*after*: `api/responses.face_out` (numpy rounds, one `tolist()` per array) into msgspec
Structs, then `msgspec.json` / `msgspec.msgpack`.

Both sides run alternately over several rounds; medians per face are printed with the ratio.
Run with `python benchmarks/wire_encoding.py`; results go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack
import msgspec
import numpy as np

from appliance.api.face_wire import face_out
from appliance.api.wire import ExtractOptions, ExtractResponse, ImageOk, Took
from appliance.pipeline.faces import Face


def make_faces(count: int, seed: int = 0) -> list[Face]:
    rng = np.random.default_rng(seed)
    faces = []
    for _ in range(count):
        vec = rng.standard_normal(512).astype(np.float32)
        norm = float(np.linalg.norm(vec))
        x, y = rng.uniform(0, 1000, 2)
        faces.append(
            Face(
                bbox=(float(x), float(y), float(x + 120.3), float(y + 130.7)),
                prob=float(rng.uniform(0.5, 1)),
                landmarks=rng.uniform(0, 1000, (5, 2)).astype(np.float32),
                vec=vec / norm,
                norm=norm,
            )
        )
    return faces


def before_face(face: Face, index: int) -> dict[str, Any]:
    """The previous encoding, kept verbatim as the reference."""
    x1, y1, x2, y2 = face.bbox
    assert face.landmarks is not None and face.vec is not None and face.norm is not None
    return {
        "num_det": index,
        "prob": round(face.prob, 6),
        "bbox": [round(x1), round(y1), round(x2), round(y2)],
        "size": round(face.size),
        "landmarks": [[round(x), round(y)] for x, y in face.landmarks],
        "norm": round(face.norm, 4),
        "vec": [round(float(v), 6) for v in face.vec],
        "facedata": None,
    }


def before(faces: list[Face], as_msgpack: bool) -> bytes:
    payload = {
        "took": {"total_ms": 1.0},
        "data": [
            {
                "status": "ok",
                "took_ms": 1.0,
                "faces": [before_face(f, i) for i, f in enumerate(faces)],
            }
        ],
    }
    if as_msgpack:
        return bytes(msgpack.packb(payload, use_bin_type=True))
    return json.dumps(payload).encode()


OPTIONS = ExtractOptions(return_landmarks=True)


def after(faces: list[Face], as_msgpack: bool) -> bytes:
    payload = ExtractResponse(
        took=Took(total_ms=1.0),
        data=[ImageOk(took_ms=1.0, faces=[face_out(f, i, OPTIONS) for i, f in enumerate(faces)])],
    )
    return msgspec.msgpack.encode(payload) if as_msgpack else msgspec.json.encode(payload)


def per_face_us(
    encode: Callable[[list[Face], bool], bytes], faces: list[Face], as_msgpack: bool, seconds: float
) -> float:
    runs = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        encode(faces, as_msgpack)
        runs += 1
    return elapsed / runs / len(faces) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, msgspec "
        f"{msgspec.__version__}, msgpack {msgpack.version}, {platform.machine()}"
    )
    # Same numbers on both sides: the response content is unchanged, only its encoding.
    sample = make_faces(1)
    old = json.loads(before(sample, False))["data"][0]["faces"][0]
    new = json.loads(after(sample, False))["data"][0]["faces"][0]
    assert old["vec"] == new["vec"] and old["norm"] == new["norm"]
    print(f"{'format':8} {'faces':>5} {'before us/face':>15} {'after us/face':>14} {'ratio':>6}")
    for as_msgpack in (False, True):
        for count in args.faces:
            faces = make_faces(count)
            b: list[float] = []
            a: list[float] = []
            for _ in range(args.rounds):
                b.append(per_face_us(before, faces, as_msgpack, args.seconds))
                a.append(per_face_us(after, faces, as_msgpack, args.seconds))
            mb, ma = statistics.median(b), statistics.median(a)
            name = "msgpack" if as_msgpack else "json"
            print(f"{name:8} {count:5d} {mb:15.1f} {ma:14.1f} {mb / ma:6.1f}")


if __name__ == "__main__":
    main()
