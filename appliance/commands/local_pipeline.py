"""A FaceAnalyzer outside the server, for commands (`gallery calibrate`), benchmarks and tests.

It loads the configured models the way the server does (registry, verified store, the
chosen backend) and runs the same batchers and FaceAnalyzer, without aiohttp.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from appliance.config import Settings
from appliance.gallery.records import Recognizer
from appliance.models.loader import load_models
from appliance.pipeline.batcher import DynamicBatcher
from appliance.pipeline.faces import FaceAnalyzer


@dataclasses.dataclass(frozen=True)
class LocalPipeline:
    analyzer: FaceAnalyzer
    recognizer: Recognizer
    # Length of the recognizer's embedding.
    dim: int


@asynccontextmanager
async def open_pipeline(settings: Settings) -> AsyncIterator[LocalPipeline]:
    # Raises ModelLoadError with the fix, as the server's start-up does.
    loaded = await asyncio.to_thread(load_models, settings)
    det, rec = loaded.detector, loaded.recognizer
    batchers = [
        DynamicBatcher(
            name, m.backend.infer, m.backend.max_batch, settings.batch_window_ms, settings.max_queue
        )
        for name, m in (("detector", det), ("recognizer", rec))
    ]
    for b in batchers:
        b.start()
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpu")
    analyzer = FaceAnalyzer(
        det.slot(batchers[0]),
        rec.slot(batchers[1]),
        executor,
        nms_threshold=settings.nms_threshold,
    )
    dim = rec.embedding_size() or int(rec.backend.outputs[0].shape[-1])
    try:
        yield LocalPipeline(analyzer, Recognizer(rec.info.name, rec.sha256), dim)
    finally:
        for b in batchers:
            await b.stop()
        executor.shutdown(wait=True, cancel_futures=True)
        loaded.close()
