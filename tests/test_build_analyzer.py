"""`loader.build_analyzer`: the one construction of batchers + FaceAnalyzer that the server and
the commands (`commands.local_pipeline`) share, on the generated test models."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from appliance.api.metrics import Metrics
from appliance.commands.local_pipeline import open_pipeline
from appliance.models.loader import build_analyzer, load_models
from appliance.pipeline.faces import AnalyzeOptions
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
