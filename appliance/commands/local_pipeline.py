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

from appliance.backends.base import InferenceBackend
from appliance.backends.factory import choose_backend, open_backend
from appliance.config import Settings
from appliance.gallery.records import Recognizer
from appliance.models import onnx_graph
from appliance.models.registry import ModelInfo, ModelRegistry
from appliance.models.store import ModelStore
from appliance.pipeline.batcher import DynamicBatcher
from appliance.pipeline.faces import FaceAnalyzer, ModelSlot


@dataclasses.dataclass(frozen=True)
class LocalPipeline:
    analyzer: FaceAnalyzer
    recognizer: Recognizer
    # Length of the recognizer's embedding.
    dim: int


def _open(
    settings: Settings, registry: ModelRegistry, info: ModelInfo, max_batch: int
) -> tuple[InferenceBackend, str, bool]:
    """The backend, the file's sha256 and whether the graph normalises its own input."""
    store = ModelStore(settings.models_dir, registry, trust_unverified=settings.trust_unverified)
    found = store.require_verified(info.name)
    assert found.sha256 is not None  # computed for every present file
    normalizes = info.normalized_in_graph
    if normalizes is None:
        normalizes = onnx_graph.normalizes_input(onnx_graph.load(found.path))
    kind, _ = choose_backend(settings)
    return open_backend(kind, settings, info, found.path, max_batch), found.sha256, normalizes


@asynccontextmanager
async def open_pipeline(settings: Settings) -> AsyncIterator[LocalPipeline]:
    registry = ModelRegistry.load(settings.override_file)
    det_info, rec_info = registry.get(settings.det_model), registry.get(settings.rec_model)
    det, _, _ = await asyncio.to_thread(
        _open, settings, registry, det_info, settings.det_batch_size
    )
    try:
        rec, rec_sha, normalizes = await asyncio.to_thread(
            _open, settings, registry, rec_info, settings.rec_batch_size
        )
    except BaseException:
        det.close()
        raise
    batchers = [
        DynamicBatcher(name, b.infer, b.max_batch, settings.batch_window_ms, settings.max_queue)
        for name, b in (("detector", det), ("recognizer", rec))
    ]
    for b in batchers:
        b.start()
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpu")
    analyzer = FaceAnalyzer(
        ModelSlot(det_info, batchers[0], tuple(o.name for o in det.outputs), settings.max_size),
        ModelSlot(
            rec_info, batchers[1], tuple(o.name for o in rec.outputs), (112, 112), normalizes
        ),
        executor,
    )
    dim = int(rec.outputs[0].shape[-1])
    try:
        yield LocalPipeline(analyzer, Recognizer(rec_info.name, rec_sha), dim)
    finally:
        for b in batchers:
            await b.stop()
        executor.shutdown(wait=True, cancel_futures=True)
        det.close()
        rec.close()
