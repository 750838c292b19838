"""One CPU thread budget for the process, split between model sessions, OpenCV and the executor.

Left to themselves, ONNX Runtime (one intra-op thread per core per session), OpenCV (a pool
per core) and the executor each size themselves to the whole machine, and on a small CPU they
fight: more runnable threads than cores, each waiting for the others. `CPU_THREADS` is the
one number; everything else follows from it.
"""

from __future__ import annotations

import dataclasses
import os

from appliance.config import Settings

# On TensorRT the GPU runs the models; two contexts let one batch's copies overlap the next
# batch's inference, more only add memory.
TENSORRT_CONTEXTS = 2


@dataclasses.dataclass(frozen=True)
class ThreadPlan:
    """How the budget is spent. `det_workers` / `rec_workers`: sessions or contexts per model,
    each driven by one batcher thread; `intra_op_threads`: ONNX Runtime threads per session;
    `opencv_threads`: OpenCV's own pool; `executor_threads`: the pre/post-processing pool."""

    cpu_threads: int
    det_workers: int
    rec_workers: int
    intra_op_threads: int
    opencv_threads: int
    executor_threads: int

    def describe(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def plan_threads(settings: Settings, backend: str, cpu_count: int | None = None) -> ThreadPlan:
    """The split for `backend` ("onnx" or "trt") on `cpu_count` cores (default: this host's).

    ONNX Runtime on CPU: one session per model using the whole budget as intra-op threads by
    default, the fastest for one client at a time. Parallel single-thread sessions
    (`DET_WORKERS`/`REC_WORKERS` = cores) served 14-21 % more at 4-16 concurrent clients on an
    idle 2-core machine but one client 38 % slower, with a third more memory
    (docs/BENCHMARKS.md, "Idle re-measure"): a setting for hosts with many clients, not the
    default. With several workers each session gets budget / workers threads.
    OpenCV runs single-threaded: its calls here are small (a resize, a warp) and already run
    on several executor threads at once. The executor gets one thread per core.
    """
    cores = cpu_count or os.cpu_count() or 1
    budget = settings.cpu_threads or cores
    default_workers = 1 if backend == "onnx" else TENSORRT_CONTEXTS
    det = settings.det_workers or default_workers
    rec = settings.rec_workers or default_workers
    intra = max(1, budget // max(det, 1)) if backend == "onnx" else 1
    return ThreadPlan(
        cpu_threads=budget,
        det_workers=det,
        rec_workers=rec,
        intra_op_threads=intra,
        opencv_threads=1,
        executor_threads=max(2, budget),
    )
