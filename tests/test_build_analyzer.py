"""`loader.build_analyzer`: the one construction of batchers + FaceAnalyzer that the server and
the commands (`commands.local_pipeline`) share, on the generated test models."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from appliance.api.metrics import Metrics
from appliance.commands.local_pipeline import open_pipeline
from appliance.models.loader import build_analyzer, load_models
from appliance.pipeline.faces import AnalyzeOptions, FaceAnalyzer
from tests.helpers import image
from tests.test_api import metric


async def test_built_analyzer_reports_batches_and_submissions_and_stops_its_threads(
    make_settings: Any,
) -> None:
    settings = make_settings(batch_window_ms=7.0, max_queue=33)
    loaded = load_models(settings)
    metrics = Metrics()
    serving = build_analyzer(loaded, settings, metrics)
    try:
        assert not serving.detector.threads and not serving.recognizer.threads  # not started
        serving.start()
        for batcher in (serving.detector, serving.recognizer):
            assert batcher.window_s == 0.007 and batcher.max_queue == 33
        results = await serving.analyzer.analyze_many(
            [image(1280, 960, seed=1), image(1280, 960, seed=2)], AnalyzeOptions()
        )
        assert [len(r.faces) for r in results] == [3, 3]
        assert all(f.vec is not None for r in results for f in r.faces)
        text = metrics.render().decode()
        assert metric(text, "appliance_batch_submissions_total", model="detector") == 2
        assert metric(text, "appliance_batch_submissions_total", model="recognizer") == 1
        assert metric(text, "appliance_batch_items_total", model="recognizer") == 6
    finally:
        await serving.stop()
        loaded.close()
    assert not serving.detector.threads and not serving.recognizer.threads


async def test_local_pipeline_is_the_servers_analyzer_on_the_thread_budget(
    make_settings: Any,
) -> None:
    # One more than the cores: the local pipeline's old fixed pool of 2 could not hold them.
    budget = (os.cpu_count() or 1) + 2
    settings = make_settings(cpu_threads=budget)
    loaded = load_models(settings)
    serving = build_analyzer(loaded, settings)
    try:
        barrier = threading.Barrier(budget, timeout=10)
        loop = asyncio.get_running_loop()
        waits = [loop.run_in_executor(serving.executor, barrier.wait) for _ in range(budget)]
        assert sorted(await asyncio.gather(*waits)) == list(range(budget))
    finally:
        await serving.stop()
        loaded.close()
    async with open_pipeline(settings) as pipe:
        rec = pipe.analyzer.recognizer
        assert rec is not None and rec.batcher.threads  # started, as build_analyzer's
        faces = (await pipe.analyzer.analyze(image(1280, 960), AnalyzeOptions())).faces
        assert len(faces) == 3 and pipe.dim == 512
    assert not rec.batcher.threads  # stopped on the way out


class CountingExecutor(ThreadPoolExecutor):
    """A real pool that counts the jobs handed to it."""

    jobs = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


async def test_a_prepared_image_skips_the_letterbox_hand_off_with_the_same_faces(
    make_settings: Any,
) -> None:
    settings = make_settings()
    loaded = load_models(settings)
    serving = build_analyzer(loaded, settings)
    serving.start()
    counting = CountingExecutor(2)
    analyzer = FaceAnalyzer(
        serving.analyzer.detector, serving.analyzer.recognizer, counting, settings.nms_threshold
    )
    img = image(1280, 960, seed=3)
    options = AnalyzeOptions(max_size=(320, 320))
    try:
        plain = (await analyzer.analyze(img, options)).faces
        assert counting.jobs == 2  # letterbox, then SCRFD decoding + alignment
        counting.jobs = 0
        # Letterboxed where the image was decoded (the REST decode job does this).
        prepared = analyzer.prepare(img, (320, 320))
        faces = (await analyzer.analyze_many([prepared], options))[0].faces
        assert counting.jobs == 1  # only the detector outputs' decoding
        # Made for another max_size, the canvas is not used: letterboxed again.
        counting.jobs = 0
        await analyzer.analyze_many([analyzer.prepare(img, None)], options)
        assert counting.jobs == 2
    finally:
        await serving.stop()
        counting.shutdown()
        loaded.close()
    assert [f.bbox for f in faces] == [f.bbox for f in plain] and len(faces) == 3
    for a, b in zip(faces, plain, strict=True):
        assert a.vec is not None and b.vec is not None
        np.testing.assert_array_equal(a.vec, b.vec)
