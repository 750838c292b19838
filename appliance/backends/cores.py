"""`CoreGate`: the CPU cores that model runs may take at once, shared by every model's pool.

On ONNX Runtime on CPU neither way of running a model wins everywhere (docs/BENCHMARKS.md,
"Adaptive sessions"): one session with a thread per core is fastest when a single run is
all there is to do (one client: each run takes every core), while single-thread sessions,
one run per core, serve the most when runs are waiting (no intra-op hand-offs, no core idle
between small operators). The gate lets each run choose: a run that finds nothing else
running or waiting takes every core and the wide session; any other takes one core and a
single-thread session, waiting for a free core first. So model threads never outnumber the
budget, whichever mix of detector and recognizer runs is in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CoreGate:
    """`cores` tokens; a wide claim takes all of them, a narrow claim one."""

    def __init__(self, cores: int) -> None:
        if cores < 1:
            raise ValueError("a core gate needs at least one core")
        self.cores = cores
        self._free = cores
        self._waiting = 0
        self._cond = threading.Condition()
        self.wide_runs = 0
        self.narrow_runs = 0

    @property
    def free(self) -> int:
        return self._free

    @contextmanager
    def claim(self, alone: bool) -> Iterator[bool]:
        """Hold cores for one model run; yields True when the run got every core.

        `alone`: the caller has nothing queued behind this run. It gets every core only if
        no run holds one and none is waiting for one, so a wide run never delays another.
        """
        with self._cond:
            wide = alone and self._free == self.cores and self._waiting == 0
            if not wide:
                self._waiting += 1
                try:
                    while self._free == 0:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
            taken = self.cores if wide else 1
            self._free -= taken
            if wide:
                self.wide_runs += 1
            else:
                self.narrow_runs += 1
        try:
            yield wide
        finally:
            with self._cond:
                self._free += taken
                self._cond.notify_all()
