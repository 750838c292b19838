"""`DynamicBatcher`: one queue per model, shared by every request and stream.

Items are collected until the model's max batch is reached or a short window has passed
since the first item arrived, then run together on one of the batcher's worker threads (one
per backend session, `DET_WORKERS` / `REC_WORKERS`); each
item's asyncio future is resolved on the event loop. The queue is bounded: when it is full,
new work is refused at once (`QueueFullError`), never queued without bound.

The worker thread outlives any one event loop's interest in its results: a loop that closed
while its items ran (a client gone, a test's loop torn down, shutdown) must not kill the
thread, so every hand-back to a loop goes through `_deliver`, which drops what cannot be
delivered and logs it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import structlog

FloatArray = npt.NDArray[np.float32]
# One item: an image as the backend takes it (uint8 HWC pixels, or float CHW).
ItemArray = npt.NDArray[Any]
Outputs = dict[str, FloatArray]
RunBatch = Callable[[ItemArray], Outputs]
# (tags of the batch's items, seconds the backend took); the API turns these into metrics.
# Tags say where each item came from ("rest", "stream"), so shared batches are visible.
BatchObserver = Callable[[list[str], float], None]
# (tag, items) of one accepted submission: a request's crops should be one, not one per image.
SubmitObserver = Callable[[str, int], None]

log = structlog.get_logger(__name__)


class BatchWorker(Protocol):
    """One model session as a worker thread drives it (a backend, seen from the pipeline)."""

    def input_buffer(self, n: int) -> ItemArray: ...

    def infer(self, batch: ItemArray) -> Outputs: ...


@runtime_checkable
class WorkerPool(Protocol):
    """Several sessions of one model (`backends.pool.BackendPool` has this shape): the
    pipeline never imports the backends, it is handed what runs the model."""

    @property
    def workers(self) -> int: ...

    def lease(self, index: int, alone: bool = False) -> AbstractContextManager[BatchWorker]:
        """Session `index` (or a wider one: `alone` says nothing is queued behind the run)."""
        ...


class Demand:
    """Analyses in progress (a request's images, a stream frame), counted where they start
    and read by the batchers' worker threads: a model run may take every core (`WorkerPool`'s
    `alone`) only while it serves the one analysis there is; with more, other runs follow
    at once and each should take one core.

    One analysis counts once however deeply it enters: the API counts a request from before
    its images are decoded (its model runs are coming), and the analyzer's own entry inside
    it, in the same task or one it started, adds nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counted: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"demand-{id(self)}", default=False
        )
        self.active = 0

    @contextmanager
    def analysis(self) -> Iterator[None]:
        if self._counted.get():
            yield
            return
        token = self._counted.set(True)
        with self._lock:
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1
            self._counted.reset(token)


class QueueFullError(RuntimeError):
    """Capacity is exhausted (a batcher's queue at MAX_QUEUE); the caller should retry later.

    The first word of the message names what is full; the API uses it as a metric label.
    """


class BatcherClosedError(RuntimeError):
    """The batcher is stopping or stopped."""


@dataclasses.dataclass
class _Item:
    data: ItemArray
    future: asyncio.Future[Outputs]
    loop: asyncio.AbstractEventLoop
    tag: str
    queued_at: float = dataclasses.field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        run_batch: RunBatch | WorkerPool,
        max_batch: int,
        window_ms: float,
        max_queue: int,
        observer: BatchObserver | None = None,
        submit_observer: SubmitObserver | None = None,
        demand: Demand | None = None,
    ) -> None:
        """`run_batch` is a function of a stacked batch, or a `WorkerPool` (also given as its
        bound `infer`): then one worker thread drives each member, assembling each batch in
        that member's input buffer. `demand`: the analyses in progress, shared with the
        analyzer; without it a run is alone whenever it leaves the queue empty."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.name = name
        self.max_batch = max_batch
        self.max_queue = max_queue
        # Settable while running: the watchdog widens the window when the device is hot.
        self.window_s = window_ms / 1000.0
        owner = getattr(run_batch, "__self__", run_batch)
        self._pool: WorkerPool | None = None
        if isinstance(owner, WorkerPool):
            self._pool = owner
        elif not isinstance(run_batch, WorkerPool):
            self._run_batch: RunBatch = run_batch
        self._observer = observer
        self._submit_observer = submit_observer
        self._demand = demand
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._stats_lock = threading.Lock()
        self.batches_run = 0
        self.items_run = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def threads(self) -> list[threading.Thread]:
        """The running worker threads (none before `start` and after `stop`)."""
        return list(self._threads)

    @property
    def workers(self) -> int:
        return self._pool.workers if self._pool is not None else 1

    def start(self) -> None:
        if self._threads:
            return
        self._threads = [
            threading.Thread(
                target=self._worker,
                args=(i,),
                name=f"batcher-{self.name}" + (f"-{i}" if self.workers > 1 else ""),
                daemon=True,
            )
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        _deliver(pending, [BatcherClosedError(f"{self.name} stopped")] * len(pending))
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._threads = []

    async def submit(self, data: ItemArray, tag: str = "") -> Outputs:
        """Run one item (one image as the backend takes it); returns its slice of every output."""
        return (await self.submit_many([data], tag))[0]

    async def submit_many(self, items: list[ItemArray], tag: str = "") -> list[Outputs]:
        """Queue several items at once: all are accepted or, if they don't fit, none."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        queued = [_Item(d, loop.create_future(), loop, tag) for d in items]
        with self._cond:
            if self._closed:
                raise BatcherClosedError(f"{self.name} batcher is stopped")
            if len(self._queue) + len(queued) > self.max_queue:
                raise QueueFullError(
                    f"{self.name} queue is full ({len(self._queue)}/{self.max_queue} items)"
                )
            self._queue.extend(queued)
            self._cond.notify()
        if self._submit_observer is not None:
            try:
                self._submit_observer(tag, len(queued))
            except Exception as exc:  # metrics must never stop inference
                log.error(
                    "submit_observer_failed",
                    batcher=self.name,
                    error=f"{type(exc).__name__}: {exc}",
                )
        try:
            return list(await asyncio.gather(*(q.future for q in queued)))
        except asyncio.CancelledError:
            # A client that went away: items still queued are skipped by the worker.
            for q in queued:
                q.future.cancel()
            raise

    def _take_batch(self) -> tuple[list[_Item], bool] | None:
        """The next batch, and whether the queue was left empty by it."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # The window counts from the oldest item's arrival: an item that already waited
            # behind a running batch must not wait a whole window more.
            deadline = self._queue[0].queued_at + self.window_s
            while len(self._queue) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Item] = []
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if not item.future.cancelled():
                    batch.append(item)
            busy = self._demand is not None and self._demand.active > 1
            return batch, not self._queue and not busy

    def _worker(self, index: int) -> None:
        while True:
            taken = self._take_batch()
            if taken is None:
                return
            batch, alone = taken
            if not batch:
                continue
            self._run(batch, index, alone)

    def _infer(self, batch: list[_Item], index: int, alone: bool) -> Outputs:
        if self._pool is None:
            return self._run_batch(np.stack([item.data for item in batch]))
        with self._pool.lease(index, alone) as backend:
            # Straight into the buffer the backend reads (page-locked memory on TensorRT):
            # one copy per item, no intermediate stacked batch.
            buffer = backend.input_buffer(len(batch))
            for row, item in zip(buffer, batch, strict=True):
                row[...] = item.data
            return backend.infer(buffer)

    def _run(self, batch: list[_Item], index: int = 0, alone: bool = False) -> None:
        start = time.perf_counter()
        try:
            outputs = self._infer(batch, index, alone)
            short = [name for name, value in outputs.items() if value.shape[0] < len(batch)]
            if short:
                raise RuntimeError(f"{self.name}: outputs {short} have fewer rows than the batch")
            results = [
                {name: value[i] for name, value in outputs.items()} for i in range(len(batch))
            ]
        except Exception as exc:  # a failed batch fails its items, never the worker
            log.warning(
                "batch_failed",
                batcher=self.name,
                items=len(batch),
                error=f"{type(exc).__name__}: {exc}",
            )
            _deliver(batch, [exc] * len(batch))
            return
        elapsed = time.perf_counter() - start
        with self._stats_lock:
            self.batches_run += 1
            self.items_run += len(batch)
        # Observed before results are handed out: a caller that sees its result also sees
        # the batch in the metrics.
        if self._observer is not None:
            try:
                self._observer([item.tag for item in batch], elapsed)
            except Exception as exc:  # metrics must never stop inference
                log.error(
                    "batch_observer_failed", batcher=self.name, error=f"{type(exc).__name__}: {exc}"
                )
        _deliver(batch, results)


def _deliver(batch: list[_Item], values: Sequence[Outputs] | Sequence[BaseException]) -> None:
    """Hand each item its result (or error): one wake-up per event loop, not one per item.

    Every `call_soon_threadsafe` writes to the loop's self-pipe and makes the worker take the
    GIL from the loop; a recognizer batch of a crowd's crops would pay that per face while
    the next batch waits for this thread.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Item, Any]]] = {}
    for item, value in zip(batch, values, strict=True):
        by_loop.setdefault(item.loop, []).append((item, value))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, pairs)
        except RuntimeError:
            # A closed loop: its awaiting tasks are gone.
            for item, _ in pairs:
                log.info("batch_result_dropped", tag=item.tag, reason="event loop closed")


def _settle(pairs: list[tuple[_Item, Any]]) -> None:
    for item, value in pairs:
        if isinstance(value, BaseException):
            _fail(item.future, value)
        else:
            _resolve(item.future, value)


def _resolve(future: asyncio.Future[Outputs], result: Outputs) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Outputs], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
