"""`PixelBudget`: a bound on decoded pixels in flight across every request and stream.

MAX_IMAGE_PIXELS bounds one image; this bounds their sum, so many concurrent requests of
large images cannot decode more than MAX_PIXELS_IN_FLIGHT pixels (3 bytes each, BGR) at once.
Past the bound, work is refused at once with `BudgetExceeded`, as the batchers refuse work
when their queues are full: waiting would hold the request bodies in memory meanwhile.

Interface for the API (admission before work):

    info = decoder.probe(raw)                 # format, width, height from the header; µs
    with decoder.budget.reserve(info.pixels) as held:   # BudgetExceeded -> 503 + Retry-After
        img = await loop.run_in_executor(pool, decoder.decode, raw, held)
        ...                                   # detect, align, embed while `img` is alive
    # released here: the decoded pixels are no longer referenced by the request

`reserve` never blocks and takes a lock for a few instructions, so it is safe on the event
loop and on executor threads alike. `ImageDecoder.decode(raw)` without a reservation reserves
for the duration of the decode itself, so every decode is bounded even before the API holds
budget per request.

`BudgetExceeded` subclasses `QueueFullError`: every caller that already answers a full queue
with 503 + Retry-After (`overloaded`) answers a full budget the same way.
"""

from __future__ import annotations

import threading
from types import TracebackType

from appliance.pipeline.batcher import QueueFullError


class BudgetExceeded(QueueFullError):
    """Decoding this image now would pass MAX_PIXELS_IN_FLIGHT; retry later."""


class PixelBudget:
    """A counter of reserved pixels with a fixed capacity; thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._in_use = 0
        self._peak = 0
        self.refused = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def peak(self) -> int:
        """The most pixels ever held at once: tests and /metrics check it never passed capacity."""
        return self._peak

    def reserve(self, pixels: int) -> Reservation:
        """Hold `pixels` until the reservation is released; BudgetExceeded at once if full."""
        if pixels < 0:
            raise ValueError("pixels must be >= 0")
        if pixels > self.capacity:
            # Settings keep MAX_IMAGE_PIXELS <= MAX_PIXELS_IN_FLIGHT, so only a caller that
            # skipped the per-image limit gets here; it could never fit, so it is not "busy".
            raise ValueError(
                f"{pixels} pixels can never fit a budget of {self.capacity} (MAX_PIXELS_IN_FLIGHT)"
            )
        with self._lock:
            if self._in_use + pixels > self.capacity:
                self.refused += 1
                # The first word names what is full: the API's metric label.
                raise BudgetExceeded(
                    f"decode budget is full ({self._in_use}/{self.capacity} pixels in flight, "
                    f"{pixels} more asked; MAX_PIXELS_IN_FLIGHT)"
                )
            self._in_use += pixels
            self._peak = max(self._peak, self._in_use)
        return Reservation(self, pixels)

    def _release(self, pixels: int) -> None:
        with self._lock:
            self._in_use -= pixels


class Reservation:
    """Pixels held in a `PixelBudget`; release once (a second release does nothing)."""

    def __init__(self, budget: PixelBudget, pixels: int) -> None:
        self.budget = budget
        self.pixels = pixels
        self._released = False
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.budget._release(self.pixels)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
