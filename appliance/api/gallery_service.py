"""The gallery inside the app: opened at start-up, called off the event loop, its typed errors
mapped to HTTP statuses, and its metrics.

Every `Gallery` method may block (fsync, a lock, a matrix product over the whole gallery), so
each call goes to the app's executor. A gallery that cannot be opened (an unwritable
`GALLERY_DB`, a database of another recognizer) does not stop detection and embeddings from
being served: the `/gallery/*` routes answer 503 `gallery_unavailable` with the reason, and
`/info` reports it under `gallery`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

import numpy as np
import structlog
from prometheus_client import Counter, Gauge, Histogram

from appliance.api.errors import ApiError, ServiceUnavailable
from appliance.api.metrics import Metrics
from appliance.gallery import (
    ExternalIdExists,
    FaceNotFound,
    Gallery,
    GalleryError,
    Identification,
    SubjectExists,
    SubjectNotFound,
)
from appliance.gallery.records import FloatArray

log = structlog.get_logger("appliance.gallery")
T = TypeVar("T")

# Exact search up to GALLERY_ANN_MIN_FACES (150,000) and the approximate one at 1M take a
# few ms (docs/BENCHMARKS.md); the buckets resolve that range and the slow tail.
SEARCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class GalleryMetrics:
    """Gallery size, search latency, identification outcomes, and on streams how many
    faces were seen against how many the recognizer ran on."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.subjects = Gauge("appliance_gallery_subjects", "Enrolled subjects", registry=r)
        self.faces = Gauge("appliance_gallery_faces", "Enrolled faces", registry=r)
        self.search_seconds = Histogram(
            "appliance_gallery_search_duration_seconds",
            "Gallery search time per call (one call may search several faces)",
            buckets=SEARCH_BUCKETS,
            registry=r,
        )
        self.identifications = Counter(
            "appliance_identifications_total",
            "Faces searched, by outcome (known: named; unknown: below the threshold)",
            ["outcome"],
            registry=r,
        )
        self.stream_faces = Counter(
            "appliance_stream_identify_faces_total",
            "Faces seen on streams with identify on",
            registry=r,
        )
        self.stream_recognitions = Counter(
            "appliance_stream_recognitions_total",
            "Recognizer calls (embed + search) on streams with identify on",
            registry=r,
        )


def http_error(exc: GalleryError) -> ApiError:
    if isinstance(exc, (SubjectNotFound, FaceNotFound)):
        return ApiError(exc.message, code=exc.code, status=404)
    if isinstance(exc, (SubjectExists, ExternalIdExists)):
        return ApiError(exc.message, code=exc.code, status=409)
    return ApiError(exc.message, code=exc.code, status=400)


class GalleryService:
    def __init__(
        self, gallery: Gallery | None, reason: str, executor: Executor, metrics: GalleryMetrics
    ) -> None:
        self._gallery = gallery
        self.reason = reason
        self.executor = executor
        self.metrics = metrics
        self.sizes = (0, 0)  # (subjects, faces) after the last write

    @property
    def available(self) -> bool:
        return self._gallery is not None

    def require(self) -> Gallery:
        if self._gallery is None:
            raise ServiceUnavailable(
                f"the gallery is unavailable: {self.reason}", code="gallery_unavailable"
            )
        return self._gallery

    async def read(self, fn: Callable[[Gallery], T]) -> T:
        """Run `fn(gallery)` in the executor; gallery errors become HTTP errors."""
        gallery = self.require()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, fn, gallery)
        except GalleryError as exc:
            raise http_error(exc) from None

    async def write(self, fn: Callable[[Gallery], T]) -> T:
        """A write, then the size gauges refreshed in the same executor job."""

        def work(gallery: Gallery) -> T:
            try:
                return fn(gallery)
            finally:
                self.refresh_sizes(gallery)

        return await self.read(work)

    def refresh_sizes(self, gallery: Gallery) -> None:
        subjects, faces = self.sizes = gallery.counts()
        self.metrics.subjects.set(subjects)
        self.metrics.faces.set(faces)

    async def identify(
        self, vecs: Sequence[FloatArray], top_k: int, threshold: float | None
    ) -> list[Identification]:
        """One search for all the faces (the gallery scores them with one matrix product)."""
        if not vecs:
            return []
        queries = np.stack([np.asarray(v, np.float32) for v in vecs])

        def search(gallery: Gallery) -> list[Identification]:
            start = time.perf_counter()
            out = gallery.identify(queries, top_k, threshold)
            self.metrics.search_seconds.observe(time.perf_counter() - start)
            return out

        answers = await self.read(search)
        self.count_outcomes(answers)
        return answers

    def count_outcomes(self, answers: Sequence[Identification]) -> None:
        known = sum(1 for a in answers if a.identity is not None)
        self.metrics.identifications.labels("known").inc(known)
        self.metrics.identifications.labels("unknown").inc(len(answers) - known)
