"""What a stream holds and counts per frame, and how many frames all streams may have in
analysis at once (`FrameSlots`). Used by `stream_session`; knows no socket and no app."""

from __future__ import annotations

import asyncio
import dataclasses
from types import TracebackType
from typing import Any

import numpy as np


@dataclasses.dataclass
class Frame:
    data: bytes
    seq: int
    ts: Any
    received: float  # perf_counter() when the frame arrived


@dataclasses.dataclass
class Counters:
    received: int = 0
    processed: int = 0
    replaced: int = 0  # a newer frame took the waiting slot while one was in flight
    over_fps: int = 0  # replaced while the worker waited for the fps cap
    busy: int = 0  # the shared batcher queue was full
    bad: int = 0  # not an image, or failed to decode
    results_dropped: int = 0  # the client did not read them in time

    @property
    def dropped(self) -> int:
        return self.replaced + self.over_fps + self.busy


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values), q)), 3)


class FrameSlots:
    """Stream frames in analysis (decode to embeddings) at once, across all streams of an app.

    Without a shared limit each stream keeps one frame queued for the detector: 16 streams
    and a detector taking 250 ms per frame (the real SCRFD on this CPU) left every frame
    waiting ~4 s in the queue, decoded and stale, while newer frames of its stream replaced
    each other behind it. A stream now takes its newest frame only once a slot is free, so
    what reaches the model is the newest frame at that moment, the detector queue holds a
    constant number of stream frames whatever the number of streams, and the model still
    never waits: `for_detector` leaves room for a batch running on every worker, as many
    queued behind them, and one more being decoded. Waiters get slots first come, first
    served (asyncio.Semaphore wakes them in order), so streams take turns.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("FrameSlots needs at least one slot")
        self.size = size
        self.in_use = 0
        self._free = asyncio.Semaphore(size)

    @classmethod
    def for_detector(cls, workers: int, max_batch: int) -> FrameSlots:
        return cls(2 * workers * max_batch + 1)

    async def __aenter__(self) -> FrameSlots:
        await self._free.acquire()
        self.in_use += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.in_use -= 1
        self._free.release()
