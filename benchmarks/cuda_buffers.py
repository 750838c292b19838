"""Round-trip and bandwidth of the TensorRT backend's pycuda buffers on a real GPU.

Checks that a full batch of detector and recogniser inputs goes host -> device -> device ->
host through `appliance.backends.cuda_buffers` unchanged, times that round trip, and measures
host-to-device and device-to-host bandwidth from page-locked and from ordinary (pageable)
memory over a range of sizes.

Run from the repository root on a machine with an NVIDIA GPU and pycuda:

    PYTHONPATH=. python benchmarks/cuda_buffers.py --json cuda_buffers.json

Only numpy and pycuda are needed (not the appliance's web dependencies).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from appliance.backends.cuda_buffers import CudaDevice, IOBuffers

MiB = 1 << 20


def round_trip(
    device: CudaDevice, label: str, shape: tuple[int, ...], repeats: int
) -> dict[str, Any]:
    """Upload a full batch, copy it to a second device buffer, download that; time it."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal(shape, dtype=np.float32)
    buffers = IOBuffers(device, {"in": (shape, np.float32), "out": (shape, np.float32)})
    try:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with device.activate() as cuda:
                buffers.upload("in", data)
                cuda.memcpy_dtod_async(
                    buffers["out"].device,
                    buffers["in"].device,
                    buffers["in"].nbytes,
                    buffers.stream,
                )
                got = buffers.download("out", shape)
                buffers.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            if not np.array_equal(got, data):
                raise SystemExit(f"{label}: data changed on the way through the GPU")
        # A smaller batch moves only the leading part of each buffer.
        part = data[: max(1, shape[0] // 2)]
        with device.activate():
            buffers.upload("in", part)
            back = buffers.download("in", part.shape)
            buffers.synchronize()
        if not np.array_equal(back, part):
            raise SystemExit(f"{label}: partial batch changed on the way through the GPU")
    finally:
        buffers.close()
    return {
        "label": label,
        "shape": list(shape),
        "mib": data.nbytes / MiB,
        "median_ms": statistics.median(times[1:] if len(times) > 1 else times),
        "verified": True,
    }


def bandwidth(device: CudaDevice, size: int, repeats: int) -> dict[str, Any]:
    """GB/s for H2D and D2H of `size` bytes, page-locked (async, timed with CUDA events)
    and pageable (synchronous, wall clock)."""
    with device.activate() as cuda:
        stream = cuda.Stream()
        pinned = cuda.pagelocked_empty(size, np.uint8)
        pinned[:] = 7
        pageable = np.full(size, 7, np.uint8)
        dev = cuda.mem_alloc(size)
        start, end = cuda.Event(), cuda.Event()
        result: dict[str, Any] = {"mib": size / MiB}
        pinned_copies: list[tuple[str, Callable[[], None]]] = [
            ("h2d_pinned", lambda: cuda.memcpy_htod_async(dev, pinned, stream)),
            ("d2h_pinned", lambda: cuda.memcpy_dtoh_async(pinned, dev, stream)),
        ]
        for name, copy in pinned_copies:
            copy()  # warm-up
            stream.synchronize()
            start.record(stream)
            for _ in range(repeats):
                copy()
            end.record(stream)
            end.synchronize()
            seconds = end.time_since(start) / 1e3
            result[name] = size * repeats / seconds / 1e9
        pageable_copies: list[tuple[str, Callable[[], None]]] = [
            ("h2d_pageable", lambda: cuda.memcpy_htod(dev, pageable)),
            ("d2h_pageable", lambda: cuda.memcpy_dtoh(pageable, dev)),
        ]
        for name, sync_copy in pageable_copies:
            sync_copy()
            t0 = time.perf_counter()
            for _ in range(repeats):
                sync_copy()
            result[name] = size * repeats / (time.perf_counter() - t0) / 1e9
        dev.free()
        pinned.base.free()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--det-batch", type=int, default=4, help="detector max batch")
    parser.add_argument("--rec-batch", type=int, default=16, help="recogniser max batch")
    parser.add_argument("--det-size", type=int, nargs=2, default=(640, 640), metavar=("W", "H"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    device = CudaDevice(args.device)
    free, total = device.memory_info()
    w, h = args.det_size
    results: dict[str, Any] = {
        "device": device.name,
        "compute_capability": device.compute_capability_text,
        "memory_total_gib": total / (1 << 30),
        "round_trips": [
            round_trip(device, "detector input", (args.det_batch, 3, h, w), args.repeats),
            round_trip(device, "recogniser input", (args.rec_batch, 3, 112, 112), args.repeats),
        ],
        "bandwidth_gb_s": [
            bandwidth(device, size * MiB, args.repeats) for size in (1, 4, 16, 64, 256)
        ],
    }
    after_free, _ = device.memory_info()
    results["device_memory_leaked_mib"] = max(0, free - after_free) / MiB
    device.release()

    print(f"{results['device']} (compute {results['compute_capability']})")
    for rt in results["round_trips"]:
        print(
            f"round trip {rt['label']:<17} {tuple(rt['shape'])!s:<20} {rt['mib']:7.2f} MiB "
            f"median {rt['median_ms']:7.3f} ms  data verified"
        )
    print(
        f"{'MiB':>6} {'H2D pinned':>11} {'D2H pinned':>11} {'H2D pageable':>13} {'D2H pageable':>13}"
    )
    for bw in results["bandwidth_gb_s"]:
        print(
            f"{bw['mib']:6.0f} {bw['h2d_pinned']:9.2f} GB/s {bw['d2h_pinned']:9.2f} GB/s "
            f"{bw['h2d_pageable']:10.2f} GB/s {bw['d2h_pageable']:10.2f} GB/s"
        )
    print(f"device memory not returned after close: {results['device_memory_leaked_mib']:.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
