"""Several sessions (or TensorRT execution contexts) of one model behind one backend.

On a CPU, single-thread ONNX Runtime sessions driven by one thread each keep every core busy
through a whole model run, where one multi-threaded session leaves cores idle between small
operators; but one client at a time is served fastest by that multi-threaded session. So on
ONNX Runtime the pool holds both by default: single-thread `members` and one `wide` session,
with a `CoreGate` shared by every model deciding which a run gets (`backends.cores`). On
TensorRT, each context has its own CUDA stream, so the copies of one batch overlap the
inference of the next. The batcher drives member `i` from its worker thread `i` (`lease`),
filling the leased session's input buffer in place.
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
from appliance.backends.cores import CoreGate


class BackendPool:
    """`InferenceBackend` over `members`, all the same model; `workers` = how many run at once.

    With a `gate`, every run first claims cores from it, and a run that gets them all runs on
    `wide` (the same model, with a thread per core) instead of its member.
    """

    def __init__(
        self,
        members: Sequence[InferenceBackend],
        wide: InferenceBackend | None = None,
        gate: CoreGate | None = None,
    ) -> None:
        if not members:
            raise BackendError("a backend pool needs at least one member")
        if wide is not None and gate is None:
            raise BackendError("a wide session needs a core gate to say when it may run")
        self.members = list(members)
        self.wide = wide
        self.gate = gate
        first = self.members[0]
        self.name = first.name
        self.batch_plan: BatchPlan = first.batch_plan
        self._locks = [threading.Lock() for _ in self.members]
        self._wide_lock = threading.Lock()

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
    def lease(self, index: int, alone: bool = False) -> Iterator[InferenceBackend]:
        """Member `index` (or the wide session), exclusively until the block ends.

        `alone`: nothing is queued behind this run, so it may take every core.
        """
        if self.gate is None:
            with self._locks[index]:
                yield self.members[index]
            return
        with self.gate.claim(alone and self.wide is not None) as wide:
            if wide and self.wide is not None:
                with self._wide_lock:
                    yield self.wide
            else:
                with self._locks[index]:
                    yield self.members[index]

    def infer(self, batch: InputArray) -> dict[str, FloatArray]:
        """Run on an idle member (any thread); waits for member 0 when all are busy."""
        index = next((i for i, lock in enumerate(self._locks) if not lock.locked()), 0)
        with self.lease(index, alone=True) as member:
            return member.infer(batch)

    def input_buffer(self, n: int) -> InputArray:
        # Not tied to a member: callers without a lease get plain memory of the right shape.
        with self._locks[0]:
            like = self.members[0].input_buffer(n)
        return np.empty_like(like)

    def close(self) -> None:
        for member in self.members:
            member.close()
        if self.wide is not None:
            self.wide.close()
