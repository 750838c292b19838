"""Several sessions (or TensorRT execution contexts) of one model behind one backend.

On a CPU, single-thread ONNX Runtime sessions driven by one thread each keep every core busy
through a whole model run, where one multi-threaded session leaves cores idle between small
operators: faster for the models alone, though on a small CPU that also serves HTTP it
measured slower (`backends.threads`: the default there is 1). On TensorRT, each context has
its own CUDA stream, so the copies of one batch overlap the inference of the next. The batcher drives member `i` from its worker thread `i`
(`lease`), filling that member's input buffer in place.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from appliance.backends.base import (
    BackendError,
    FloatArray,
    InferenceBackend,
    InputArray,
    TensorSpec,
)
from appliance.backends.batching import BatchPlan


class BackendPool:
    """`InferenceBackend` over `members`, all the same model; `workers` = how many run at once."""

    def __init__(self, members: Sequence[InferenceBackend]) -> None:
        if not members:
            raise BackendError("a backend pool needs at least one member")
        self.members = list(members)
        first = self.members[0]
        self.name = first.name
        self.batch_plan: BatchPlan = first.batch_plan
        self._locks = [threading.Lock() for _ in self.members]

    @property
    def workers(self) -> int:
        return len(self.members)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.members[0].inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.members[0].outputs

    @property
    def max_batch(self) -> int:
        return self.members[0].max_batch

    @contextmanager
    def lease(self, index: int) -> Iterator[InferenceBackend]:
        """Member `index`, exclusively until the block ends."""
        with self._locks[index]:
            yield self.members[index]

    def infer(self, batch: InputArray) -> dict[str, FloatArray]:
        """Run on the first idle member (any thread); waits for member 0 when all are busy."""
        for index, lock in enumerate(self._locks):
            if lock.acquire(blocking=False):
                try:
                    return self.members[index].infer(batch)
                finally:
                    lock.release()
        with self.lease(0) as member:
            return member.infer(batch)

    def input_buffer(self, n: int) -> InputArray:
        # Not tied to a member: callers without a lease get plain memory of the right shape.
        with self.lease(0) as member:
            like = member.input_buffer(n)
        return np.empty_like(like)

    def close(self) -> None:
        for member in self.members:
            member.close()
