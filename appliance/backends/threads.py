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
class ModelThreads:
    """One model's sessions: `workers` sessions (or TensorRT contexts) of `intra_op_threads`
    ONNX Runtime threads each, one batcher thread each, plus, when `wide_threads` > 0, one
    session of `wide_threads` threads for runs that find every core free (`backends.cores`)."""

    workers: int
    intra_op_threads: int
    wide_threads: int = 0

    @property
    def adaptive(self) -> bool:
        return self.wide_threads > 0


@dataclasses.dataclass(frozen=True)
class ThreadPlan:
    """How the budget is spent: each model's sessions, OpenCV's own pool and the
    pre/post-processing executor."""

    cpu_threads: int
    det: ModelThreads
    rec: ModelThreads
    opencv_threads: int
    executor_threads: int

    @property
    def adaptive(self) -> bool:
        """Whether some model chooses per run between its wide and single-thread sessions."""
        return self.det.adaptive or self.rec.adaptive

    def describe(self) -> dict[str, int]:
        return {
            "cpu_threads": self.cpu_threads,
            "det_workers": self.det.workers,
            "det_intra_op_threads": self.det.intra_op_threads,
            "det_wide_threads": self.det.wide_threads,
            "rec_workers": self.rec.workers,
            "rec_intra_op_threads": self.rec.intra_op_threads,
            "rec_wide_threads": self.rec.wide_threads,
            "opencv_threads": self.opencv_threads,
            "executor_threads": self.executor_threads,
        }


def _model_threads(workers_setting: int, budget: int, backend: str) -> ModelThreads:
    if backend != "onnx":
        return ModelThreads(workers_setting or TENSORRT_CONTEXTS, 1)
    if workers_setting:
        # Fixed: the budget split evenly between the sessions, every run on its own one.
        return ModelThreads(workers_setting, max(1, budget // workers_setting))
    if budget == 1:
        return ModelThreads(1, 1)
    return ModelThreads(budget, 1, wide_threads=budget)


def plan_threads(settings: Settings, backend: str, cpu_count: int | None = None) -> ThreadPlan:
    """The split for `backend` ("onnx" or "trt") on `cpu_count` cores (default: this host's).

    ONNX Runtime on CPU, by default (`DET_WORKERS`/`REC_WORKERS` 0): adaptive. A model gets one
    single-thread session per core of the budget and one session with a thread per core; a
    run alone takes the wide one, runs that queue share the cores one each. On an idle 2-core
    machine fixed single-thread sessions served 14-21 % more than one 2-thread session at
    4-16 clients but one client 38 % slower (docs/BENCHMARKS.md, "Idle re-measure"); adaptive
    keeps both. A number of workers fixes the split instead: that many sessions, the budget
    divided between them. OpenCV runs single-threaded: its calls here are small (a resize, a
    warp) and already run on several executor threads at once. The executor gets one thread
    per core.
    """
    cores = cpu_count or os.cpu_count() or 1
    budget = settings.cpu_threads or cores
    return ThreadPlan(
        cpu_threads=budget,
        det=_model_threads(settings.det_workers, budget, backend),
        rec=_model_threads(settings.rec_workers, budget, backend),
        opencv_threads=1,
        executor_threads=max(2, budget),
    )
