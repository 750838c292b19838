"""A FaceAnalyzer outside the server, for commands (`gallery calibrate`), benchmarks and tests.

It loads the configured models the way the server does (registry, verified store, the
chosen backend) and builds the same batchers and FaceAnalyzer (`loader.build_analyzer`),
without aiohttp.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from appliance.config import Settings
from appliance.gallery.records import Recognizer
from appliance.models.loader import build_analyzer, load_models
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
    try:
        serving = build_analyzer(loaded, settings)
        serving.start()
    except BaseException:
        loaded.close()
        raise
    rec = loaded.recognizer
    dim = rec.embedding_size() or int(rec.backend.outputs[0].shape[-1])
    try:
        yield LocalPipeline(serving.analyzer, Recognizer(rec.info.name, rec.sha256), dim)
    finally:
        await serving.stop()
        loaded.close()
