"""What does a decompression bomb cost, with and without the header check?

For each bomb (a tiny file claiming a huge size, one per accepted format) it measures, in a
fresh process each so peak RSS is the bomb's own:

(a) `ImageDecoder.decode`, which refuses from the header, and
(b) plain `cv2.imdecode` with OpenCV's own limit lifted (OPENCV_IO_MAX_IMAGE_PIXELS=2^31),
    which is what decoding cost before the header check covered every format.

It prints the median time and the peak RSS growth of each. Run with
`python benchmarks/image_admission.py`; results go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, statistics, sys, time
sys.path.insert(0, sys.argv[1])
mode, kind = sys.argv[2], sys.argv[3]
import numpy as np
from tests.image_samples import bombs
import cv2
from appliance.pipeline.images import ImageDecoder, ImageError
data = bombs(40_000_000)[kind]
decoder = ImageDecoder.create(40_000_000)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(5 if mode == "opencv" else 2000):
    t = time.perf_counter()
    if mode == "opencv":
        try:
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            pass
    else:
        try:
            decoder.decode(data)
        except ImageError:
            pass
    times.append(time.perf_counter() - t)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
print(json.dumps({"bytes": len(data), "median_s": statistics.median(times), "rss_mb": grown}))
"""

KINDS = ["bmp_rle", "bmp_os2", "jpeg", "png", "webp_vp8", "webp_vp8l", "webp_vp8x"]


def run(mode: str, kind: str) -> dict[str, float]:
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": str(2**31)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), mode, kind],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    print(
        f"{'bomb':<10} {'bytes':>6} | {'header check':>14} {'RSS':>7} | {'cv2.imdecode':>13} {'RSS':>8}"
    )
    for kind in KINDS:
        ours, bare = run("appliance", kind), run("opencv", kind)
        print(
            f"{kind:<10} {int(ours['bytes']):>6} | {ours['median_s'] * 1e6:>11.1f} µs "
            f"{ours['rss_mb']:>5.0f} MB | {bare['median_s'] * 1e3:>10.1f} ms {bare['rss_mb']:>6.0f} MB"
        )


if __name__ == "__main__":
    main()
