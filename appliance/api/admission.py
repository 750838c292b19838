"""Admission before work: what an image costs is known, and reserved, before it is decoded.

`decode_admitted` is the one path from bytes to pixels for REST and streams: the header is read
(`probe`, microseconds, no pixel decoded), the image's pixels are reserved in the app's
`PixelBudget` (`BudgetExceeded`, a `QueueFullError`, at once when full), and only then is it
decoded in the executor. The caller holds the returned reservation until it no longer needs
the pixels (after detection and embedding), so the budget bounds what is really alive.

`run_all` runs one request's images as sibling tasks and, at the first failure, cancels the
others: once one image's `QueueFullError` has decided the answer (503), feeding the batchers
with its siblings would only take capacity from requests that can still succeed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

from appliance.pipeline.budget import Reservation
from appliance.pipeline.images import ImageArray, ImageDecoder

T = TypeVar("T")

# Above this size base64 decoding and body parsing go to the executor; below it the hop to a
# thread costs more than the work.
OFFLOAD_BYTES = 256 * 1024


async def decode_admitted(
    decoder: ImageDecoder, executor: Executor, raw: bytes
) -> tuple[ImageArray, Reservation]:
    """probe -> reserve -> decode; the caller releases the reservation when done with the pixels.

    Raises `ImageError` (bad image: from the header, nothing reserved), `BudgetExceeded`
    (too many pixels in flight: nothing decoded).
    """
    return await decode_admitted_with(decoder, executor, raw, decoder.decode)


async def decode_admitted_with(
    decoder: ImageDecoder, executor: Executor, raw: bytes, job: Callable[[bytes, Reservation], T]
) -> tuple[T, Reservation]:
    """`decode_admitted` with the executor's work given: `job(raw, reservation)` decodes under
    the reservation and may go on with the pixels in the same hand-off (REST letterboxes them
    for the detector there; JPEG_DCT_SCALING decodes at a reduced scale). The image's full
    pixels are reserved whatever the job: the header is all that is known before it runs."""
    info = decoder.probe(raw)
    held = decoder.budget.reserve(info.pixels)
    try:
        value = await asyncio.get_running_loop().run_in_executor(executor, job, raw, held)
    except BaseException:
        held.release()
        raise
    return value, held


async def off_loop(executor: Executor, size: int, fn: Callable[[], T]) -> T:
    """Run `fn` in the executor when its input is large, inline when it is small."""
    if size <= OFFLOAD_BYTES:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(executor, fn)


async def run_all(factories: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Results in order, at most `limit` running at once; the first exception cancels the rest.

    Python 3.10 (the Jetson's JetPack 5/6 Python) has no `asyncio.TaskGroup`; this is the part
    of it a request needs (sibling cancellation, results in order) in a few lines, where anyio
    or the `taskgroup` backport would add a dependency and ExceptionGroup handling to every
    caller for the same effect.
    """
    gate = asyncio.Semaphore(max(1, limit))

    async def gated(factory: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await factory()

    tasks = [asyncio.ensure_future(gated(f)) for f in factories]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        # Cancelled siblings finish (their reservations released) before the answer goes out.
        await asyncio.gather(*tasks, return_exceptions=True)
