"""`DynamicBatcher`: one queue per model, shared by every request and stream.

Items are collected until the model's max batch is reached or a short window has passed
since the first item arrived, then run together on the batcher's own worker thread; each
item's asyncio future is resolved on the event loop. The queue is bounded: when it is full,
new work is refused at once (`QueueFullError`), never queued without bound.

The worker thread outlives any one event loop's interest in its results: a loop that closed
while its items ran (a client gone, a test's loop torn down, shutdown) must not kill the
thread, so every hand-back to a loop goes through `_post`, which drops what cannot be
delivered and logs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

FloatArray = npt.NDArray[np.float32]
Outputs = dict[str, FloatArray]
RunBatch = Callable[[FloatArray], Outputs]
# (tags of the batch's items, seconds the backend took); the API turns these into metrics.
# Tags say where each item came from ("rest", "stream"), so shared batches are visible.
BatchObserver = Callable[[list[str], float], None]

log = structlog.get_logger(__name__)


class QueueFullError(RuntimeError):
    """Capacity is exhausted (a batcher's queue at MAX_QUEUE); the caller should retry later.

    The first word of the message names what is full; the API uses it as a metric label.
    """


class BatcherClosedError(RuntimeError):
    """The batcher is stopping or stopped."""


@dataclasses.dataclass
class _Item:
    data: FloatArray
    future: asyncio.Future[Outputs]
    loop: asyncio.AbstractEventLoop
    tag: str
    queued_at: float = dataclasses.field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        max_batch: int,
        window_ms: float,
        max_queue: int,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.name = name
        self.max_batch = max_batch
        self.max_queue = max_queue
        # Settable while running: the watchdog widens the window when the device is hot.
        self.window_s = window_ms / 1000.0
        self._run_batch = run_batch
        self._observer = observer
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.items_run = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._worker, name=f"batcher-{self.name}", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            _post(item, _fail, BatcherClosedError(f"{self.name} stopped"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def submit(self, data: FloatArray, tag: str = "") -> Outputs:
        """Run one item (C, H, W); returns its slice of every output."""
        return (await self.submit_many([data], tag))[0]

    async def submit_many(self, items: list[FloatArray], tag: str = "") -> list[Outputs]:
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
        try:
            return list(await asyncio.gather(*(q.future for q in queued)))
        except asyncio.CancelledError:
            # A client that went away: items still queued are skipped by the worker.
            for q in queued:
                q.future.cancel()
            raise

    def _take_batch(self) -> list[_Item] | None:
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
            return batch

    def _worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        try:
            outputs = self._run_batch(np.stack([item.data for item in batch]))
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
            for item in batch:
                _post(item, _fail, exc)
            return
        elapsed = time.perf_counter() - start
        self.batches_run += 1
        self.items_run += len(batch)
        for item, result in zip(batch, results, strict=True):
            _post(item, _resolve, result)
        if self._observer is not None:
            try:
                self._observer([item.tag for item in batch], elapsed)
            except Exception as exc:  # metrics must never stop inference
                log.error(
                    "batch_observer_failed", batcher=self.name, error=f"{type(exc).__name__}: {exc}"
                )


def _post(
    item: _Item, callback: Callable[[asyncio.Future[Outputs], Any], None], value: Any
) -> None:
    """Hand a result or an error to the item's loop; a closed loop has nobody to tell."""
    try:
        item.loop.call_soon_threadsafe(callback, item.future, value)
    except RuntimeError:
        # call_soon_threadsafe raises RuntimeError on a closed loop: its awaiting task is gone.
        log.info("batch_result_dropped", tag=item.tag, reason="event loop closed")


def _resolve(future: asyncio.Future[Outputs], result: Outputs) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Outputs], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
