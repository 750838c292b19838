"""DynamicBatcher with a real event loop and its real worker thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import structlog
import structlog.testing

from appliance.pipeline.batcher import (
    BatcherClosedError,
    DynamicBatcher,
    Outputs,
    QueueFullError,
)


class Recorder:
    """A run_batch that records what it was given; optionally blocks until released."""

    def __init__(self, block: bool = False) -> None:
        self.sizes: list[int] = []
        self.seen: list[float] = []  # first value of every row it ran
        self.threads: set[str] = set()
        self.started = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()

    def __call__(self, batch: np.ndarray) -> Outputs:
        self.threads.add(threading.current_thread().name)
        self.started.set()
        assert self.release.wait(5), "test never released the batch"
        self.sizes.append(batch.shape[0])
        self.seen.extend(float(v) for v in batch[:, 0])
        if (batch[:, 0] < 0).any():
            raise RuntimeError("negative input")
        return {"double": batch * 2, "first": batch[:, 0].copy()}


def item(value: float) -> np.ndarray:
    # One (C,) "image"; the value tells items apart.
    return np.array([value, value + 0.5, value + 0.25], np.float32)


def make(
    run: Callable[[np.ndarray], Outputs],
    max_batch: int = 4,
    window_ms: float = 50.0,
    max_queue: int = 64,
    observer: Callable[[list[str], float], None] | None = None,
) -> DynamicBatcher:
    return DynamicBatcher("test", run, max_batch, window_ms, max_queue, observer)


@pytest.fixture
async def batchers() -> AsyncIterator[list[DynamicBatcher]]:
    made: list[DynamicBatcher] = []
    yield made
    for b in made:
        await b.stop()


def test_invalid_sizes_rejected() -> None:
    with pytest.raises(ValueError):
        make(Recorder(), max_batch=0)
    with pytest.raises(ValueError):
        make(Recorder(), max_queue=0)


async def test_concurrent_submits_are_batched(batchers: list[DynamicBatcher]) -> None:
    rec = Recorder()
    b = make(rec, max_batch=4, window_ms=50)
    batchers.append(b)
    b.start()
    results = await asyncio.gather(*(b.submit(item(i)) for i in range(8)))
    assert sum(rec.sizes) == 8
    assert max(rec.sizes) <= 4
    assert len(rec.sizes) < 8
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["double"], item(i) * 2)
        assert out["first"] == i
    assert b.batches_run == len(rec.sizes)
    assert b.items_run == 8
    # The backend ran on the batcher's own thread, not the event loop's.
    assert rec.threads == {"batcher-test"}


async def test_single_item_waits_about_the_window(batchers: list[DynamicBatcher]) -> None:
    rec = Recorder()
    b = make(rec, max_batch=4, window_ms=50)
    batchers.append(b)
    b.start()
    start = time.monotonic()
    out = await b.submit(item(1))
    elapsed = time.monotonic() - start
    assert out["first"] == 1
    assert rec.sizes == [1]
    # Waited for company for the window, and not much longer.
    assert 0.04 <= elapsed < 0.25


async def test_full_batch_does_not_wait_for_window(batchers: list[DynamicBatcher]) -> None:
    rec = Recorder()
    b = make(rec, max_batch=2, window_ms=1000)
    batchers.append(b)
    b.start()
    start = time.monotonic()
    outs = await b.submit_many([item(1), item(2)])
    assert time.monotonic() - start < 0.5
    assert rec.sizes == [2]
    assert [float(o["first"]) for o in outs] == [1.0, 2.0]


async def test_submit_many_all_or_nothing(batchers: list[DynamicBatcher]) -> None:
    rec = Recorder()
    b = make(rec, max_batch=8, window_ms=0, max_queue=3)
    batchers.append(b)  # not started yet: the queue only fills
    first = asyncio.create_task(b.submit_many([item(1), item(2)]))
    await asyncio.sleep(0)
    assert b.depth == 2
    with pytest.raises(QueueFullError, match="2/3"):
        await b.submit_many([item(3), item(4)])
    assert b.depth == 2  # nothing of the refused request was queued
    third = asyncio.create_task(b.submit(item(5)))
    await asyncio.sleep(0)
    assert b.depth == 3
    with pytest.raises(QueueFullError):
        await b.submit(item(6))
    b.start()
    outs = await asyncio.wait_for(first, 2)
    out5 = await asyncio.wait_for(third, 2)
    assert [float(o["first"]) for o in outs] == [1.0, 2.0]
    assert out5["first"] == 5
    assert sorted(rec.seen) == [1.0, 2.0, 5.0]


async def test_submit_many_empty_is_noop() -> None:
    b = make(Recorder())
    assert await b.submit_many([]) == []


async def test_failed_batch_fails_only_its_items(batchers: list[DynamicBatcher]) -> None:
    rec = Recorder()
    b = make(rec, max_batch=2, window_ms=20)
    batchers.append(b)
    b.start()
    bad, good = await asyncio.gather(
        b.submit_many([item(-1), item(1)]),
        b.submit_many([item(2), item(3)]),
        return_exceptions=True,
    )
    assert isinstance(bad, RuntimeError)
    assert str(bad) == "negative input"
    assert isinstance(good, list)
    assert [float(o["first"]) for o in good] == [2.0, 3.0]
    # The worker survived: the next batch works.
    out = await asyncio.wait_for(b.submit(item(4)), 2)
    assert out["first"] == 4
    assert b.items_run == 3  # failed batches do not count as run


async def test_stop_fails_pending_and_joins_thread() -> None:
    rec = Recorder(block=True)
    b = make(rec, max_batch=1, window_ms=0)
    b.start()
    (thread,) = b.threads
    assert thread.is_alive()
    running = asyncio.create_task(b.submit(item(1)))
    assert await asyncio.to_thread(rec.started.wait, 2)
    pending = [asyncio.create_task(b.submit(item(v))) for v in (2, 3)]
    await asyncio.sleep(0)
    assert b.depth == 2
    asyncio.get_running_loop().call_later(0.05, rec.release.set)
    await asyncio.wait_for(b.stop(), 2)
    assert not thread.is_alive()
    assert b.threads == []
    for task in pending:
        with pytest.raises(BatcherClosedError):
            await task
    # The batch already on the backend finishes normally.
    assert (await running)["first"] == 1
    assert rec.seen == [1.0]
    with pytest.raises(BatcherClosedError):
        await b.submit(item(4))


async def test_stop_idle_and_twice() -> None:
    b = make(Recorder())
    b.start()
    b.start()  # idempotent
    await asyncio.wait_for(b.stop(), 2)
    await asyncio.wait_for(b.stop(), 2)
    never_started = make(Recorder())
    await never_started.stop()


async def test_cancelled_items_are_skipped(batchers: list[DynamicBatcher]) -> None:
    rec = Recorder(block=True)
    b = make(rec, max_batch=4, window_ms=0)
    batchers.append(b)
    b.start()
    first = asyncio.create_task(b.submit(item(1)))
    assert await asyncio.to_thread(rec.started.wait, 2)
    doomed = asyncio.create_task(b.submit_many([item(2), item(3)]))
    kept = asyncio.create_task(b.submit(item(4)))
    await asyncio.sleep(0)
    assert b.depth == 3
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    rec.release.set()
    assert (await asyncio.wait_for(first, 2))["first"] == 1
    assert (await asyncio.wait_for(kept, 2))["first"] == 4
    assert rec.seen == [1.0, 4.0]
    assert rec.sizes == [1, 1]


async def test_each_item_gets_its_own_row(batchers: list[DynamicBatcher]) -> None:
    rec = Recorder()
    b = make(rec, max_batch=8, window_ms=30)
    batchers.append(b)
    b.start()
    a, c = await asyncio.gather(
        b.submit_many([item(10), item(11), item(12)]),
        b.submit_many([item(20), item(21)]),
    )
    assert rec.sizes == [5]
    for value, out in zip([10, 11, 12], a, strict=True):
        np.testing.assert_array_equal(out["double"], item(value) * 2)
        assert out["double"].shape == (3,)
        assert out["first"] == value
    assert [float(o["first"]) for o in c] == [20.0, 21.0]


async def test_observer_gets_tags_and_duration(batchers: list[DynamicBatcher]) -> None:
    seen: list[tuple[list[str], float]] = []
    rec = Recorder()
    b = make(rec, max_batch=4, window_ms=30, observer=lambda tags, s: seen.append((tags, s)))
    batchers.append(b)
    b.start()
    await asyncio.gather(
        b.submit(item(1), tag="rest"),
        b.submit_many([item(2), item(3)], tag="stream"),
    )
    assert len(seen) == 1
    tags, seconds = seen[0]
    assert tags == ["rest", "stream", "stream"]
    assert 0 <= seconds < 1


async def test_window_is_settable_while_running(batchers: list[DynamicBatcher]) -> None:
    rec = Recorder()
    b = make(rec, max_batch=4, window_ms=0)
    batchers.append(b)
    b.start()
    b.window_s = 0.15
    start = time.monotonic()
    await b.submit(item(1))
    assert time.monotonic() - start >= 0.12


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_observer_error_does_not_kill_worker(batchers: list[DynamicBatcher]) -> None:
    def observer(tags: list[str], seconds: float) -> None:
        raise RuntimeError("metrics broke")

    b = make(Recorder(), max_batch=1, window_ms=0, observer=observer)
    batchers.append(b)
    b.start()
    await asyncio.gather(
        asyncio.wait_for(b.submit(item(1)), 0.5), return_exceptions=True
    )  # whatever this one gets, the worker must live on
    assert [t.is_alive() for t in b.threads] == [True]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_short_output_fails_items_not_worker(batchers: list[DynamicBatcher]) -> None:
    def short(batch: np.ndarray) -> Outputs:
        return {"out": batch[:1]}

    b = make(short, max_batch=2, window_ms=20)
    batchers.append(b)
    b.start()
    results = await asyncio.gather(
        asyncio.wait_for(b.submit_many([item(1), item(2)]), 0.5), return_exceptions=True
    )
    assert not isinstance(results[0], asyncio.TimeoutError)
    assert [t.is_alive() for t in b.threads] == [True]


async def test_window_counts_from_first_arrival(batchers: list[DynamicBatcher]) -> None:
    rec = Recorder(block=True)
    b = make(rec, max_batch=4, window_ms=150)
    batchers.append(b)
    b.start()
    first = asyncio.create_task(b.submit(item(1)))
    assert await asyncio.to_thread(rec.started.wait, 2)  # worker busy with item 1
    second = asyncio.create_task(b.submit(item(2)))
    await asyncio.sleep(0.3)  # item 2 has now waited twice the window
    released = time.monotonic()
    rec.release.set()
    await asyncio.wait_for(first, 2)
    await asyncio.wait_for(second, 2)
    assert time.monotonic() - released < 0.1


def test_batcher_call_soon_threadsafe_at_shutdown_keeps_worker_alive() -> None:
    """Issue 12 defect 7: a result for a loop that closed meanwhile must not kill the worker."""
    rec = Recorder(block=True)
    b = make(rec, max_batch=1, window_ms=0)
    b.start()
    (thread,) = b.threads
    doomed = asyncio.new_event_loop()
    task = doomed.create_task(b.submit(item(1)))
    # Run the doomed loop until the worker holds its item, then close it under the worker.
    doomed.run_until_complete(asyncio.to_thread(rec.started.wait, 5))
    task.cancel()
    doomed.run_until_complete(asyncio.gather(task, return_exceptions=True))
    doomed.close()
    with structlog.testing.capture_logs() as logs:
        rec.release.set()
        # The worker hands item 1's result to the closed loop, then must serve the next item.
        out = asyncio.run(asyncio.wait_for(b.submit(item(2)), 5))
    assert out["first"] == 2
    assert thread.is_alive()
    assert rec.seen == [1.0, 2.0]
    dropped = [e for e in logs if e["event"] == "batch_result_dropped"]
    assert dropped == [
        {
            "event": "batch_result_dropped",
            "tag": "",
            "reason": "event loop closed",
            "log_level": "info",
        }
    ]
    asyncio.run(b.stop())
    assert not thread.is_alive()


async def test_batcher_backend_raising_mid_batch_fails_only_that_batch(
    batchers: list[DynamicBatcher],
) -> None:
    """Issue 12 faults: a backend error fails that batch's futures; the next batch works."""
    calls = 0

    def flaky(batch: np.ndarray) -> Outputs:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"first": batch[:, 0].copy()}

    b = make(flaky, max_batch=2, window_ms=1000)
    batchers.append(b)
    b.start()
    with structlog.testing.capture_logs() as logs:
        first = await asyncio.wait_for(b.submit_many([item(1), item(2)]), 5)
        failed = await asyncio.gather(
            asyncio.wait_for(b.submit_many([item(3), item(4)]), 5), return_exceptions=True
        )
        after = await asyncio.wait_for(b.submit_many([item(5), item(6)]), 5)
    assert [float(o["first"]) for o in first] == [1.0, 2.0]
    assert isinstance(failed[0], RuntimeError)
    assert "illegal memory access" in str(failed[0])
    assert [float(o["first"]) for o in after] == [5.0, 6.0]
    assert (calls, b.batches_run, b.items_run) == (3, 2, 4)
    assert [e for e in logs if e["event"] == "batch_failed"] == [
        {
            "event": "batch_failed",
            "batcher": "test",
            "items": 2,
            "error": "RuntimeError: CUDA error: an illegal memory access was encountered",
            "log_level": "warning",
        }
    ]


async def test_batcher_logs_through_structlog_not_stdlib(batchers: list[DynamicBatcher]) -> None:
    """Issue 12 defect 7: the batcher's events reach structlog (JSON in production)."""

    def observer(tags: list[str], seconds: float) -> None:
        raise ValueError("metrics broke")

    b = make(Recorder(), max_batch=1, window_ms=0, observer=observer)
    batchers.append(b)
    b.start()
    expected = {
        "event": "batch_observer_failed",
        "batcher": "test",
        "error": "ValueError: metrics broke",
        "log_level": "error",
    }
    with structlog.testing.capture_logs() as logs:
        assert (await asyncio.wait_for(b.submit(item(7)), 5))["first"] == 7
        # The observer runs after the futures are resolved: wait for its event.
        for _ in range(100):
            if expected in logs:
                break
            await asyncio.sleep(0.02)
    assert expected in logs


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the wake-ups other threads ask of it."""

    wakeups = 0

    def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> asyncio.Handle:
        self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_a_batch_wakes_its_event_loop_once_not_once_per_item() -> None:
    rec = Recorder()
    b = make(rec, max_batch=8, window_ms=0)
    b.start()
    loop = CountingLoop()
    try:
        outs = loop.run_until_complete(b.submit_many([item(i) for i in range(8)]))
        ok_wakeups = loop.wakeups

        async def failing() -> list[Any]:
            return await asyncio.gather(b.submit_many([item(-1), item(1)]), return_exceptions=True)

        failed = loop.run_until_complete(failing())
        fail_wakeups = loop.wakeups - ok_wakeups
    finally:
        loop.run_until_complete(b.stop())
        loop.close()
    assert rec.sizes == [8, 2]  # one batch of eight, one of two
    assert [float(o["first"]) for o in outs] == list(range(8))
    assert ok_wakeups == 1
    # A failed batch fails all its items with one wake-up too.
    assert isinstance(failed[0], RuntimeError) and fail_wakeups == 1
