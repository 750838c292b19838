"""Several model sessions behind one batcher, and the one CPU thread budget."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from appliance.backends.base import FloatArray, InputArray
from appliance.backends.ort import OnnxRuntimeBackend
from appliance.backends.pool import BackendPool
from appliance.backends.threads import TENSORRT_CONTEXTS, plan_threads
from appliance.config import ConfigError, load_settings
from appliance.models import onnx_graph
from appliance.models.registry import ModelRegistry
from appliance.pipeline.batcher import DynamicBatcher
from tests.real_data import REAL_RECOGNIZER


class Counted:
    """A real session that records which threads ran it."""

    def __init__(self, backend: OnnxRuntimeBackend) -> None:
        self.inner = backend
        self.name = backend.name
        self.batch_plan = backend.batch_plan
        self.inputs = backend.inputs
        self.outputs = backend.outputs
        self.max_batch = backend.max_batch
        self.threads: set[str] = set()
        self.calls = 0

    def input_buffer(self, n: int) -> InputArray:
        return self.inner.input_buffer(n)

    def infer(self, batch: InputArray) -> dict[str, FloatArray]:
        self.threads.add(threading.current_thread().name)
        self.calls += 1
        return self.inner.infer(batch)

    def close(self) -> None:
        self.inner.close()


def recognizer(real_models: Path) -> OnnxRuntimeBackend:
    info = ModelRegistry.load(real_models / "none.json").get(REAL_RECOGNIZER)
    pre = info.default_preprocess
    return OnnxRuntimeBackend(
        real_models / f"{REAL_RECOGNIZER}.onnx",
        info,
        max_batch=2,
        intra_op_threads=1,
        image_shape=(3, 112, 112),
        input_rewrite=onnx_graph.InputRewrite(pre.rgb, pre.mean, pre.std),
    )


async def test_two_sessions_serve_one_batcher_with_the_results_of_one(real_models: Path) -> None:
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(24)]
    single = recognizer(real_models)
    expected = [single.infer(c[None])["output0"][0] for c in crops]
    members = [Counted(recognizer(real_models)) for _ in range(2)]
    pool = BackendPool(members)
    # As the app wires it: the pool's bound `infer`.
    batcher = DynamicBatcher("recognizer", pool.infer, max_batch=2, window_ms=0, max_queue=64)
    batcher.start()
    try:
        assert batcher.workers == 2 and len(batcher.threads) == 2
        results = await asyncio.gather(*(batcher.submit(c) for c in crops))
    finally:
        await batcher.stop()
        pool.close()
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got["output0"], want, rtol=1e-5, atol=1e-5)
    assert batcher.items_run == 24
    # Each member is driven by its own batcher thread, and both took work.
    assert all(m.calls > 0 for m in members)
    assert members[0].threads.isdisjoint(members[1].threads)
    assert all(len(m.threads) == 1 for m in members)


def test_pool_infer_from_any_thread_uses_an_idle_member(real_models: Path) -> None:
    pool = BackendPool([recognizer(real_models), recognizer(real_models)])
    crop = np.full((1, 112, 112, 3), 128, np.uint8)
    with pool.lease(0):
        # Member 0 is busy: infer runs on member 1 instead of waiting.
        out = pool.infer(crop)
    assert out["output0"].shape == (1, 128)
    assert pool.input_buffer(2).shape == (2, 112, 112, 3)
    pool.close()


def test_thread_budget_onnx_defaults_to_one_session_on_every_core() -> None:
    plan = plan_threads(load_settings(env={}), "onnx", cpu_count=2)
    assert (plan.cpu_threads, plan.det_workers, plan.rec_workers) == (2, 1, 1)
    assert plan.intra_op_threads == 2 and plan.opencv_threads == 1
    assert plan.executor_threads == 2


def test_thread_budget_splits_cores_between_parallel_sessions() -> None:
    settings = load_settings(env={"DET_WORKERS": "2", "REC_WORKERS": "2"})
    plan = plan_threads(settings, "onnx", cpu_count=2)
    assert (plan.det_workers, plan.rec_workers, plan.intra_op_threads) == (2, 2, 1)


def test_thread_budget_follows_cpu_threads_and_explicit_workers() -> None:
    settings = load_settings(env={"CPU_THREADS": "8", "DET_WORKERS": "1", "REC_WORKERS": "2"})
    plan = plan_threads(settings, "onnx", cpu_count=2)
    assert plan.cpu_threads == 8 and plan.det_workers == 1 and plan.rec_workers == 2
    # One detector session gets the whole budget as intra-op threads.
    assert plan.intra_op_threads == 8
    assert plan.executor_threads == 8


def test_thread_budget_on_tensorrt_uses_contexts_not_cpu_threads() -> None:
    plan = plan_threads(load_settings(env={}), "trt", cpu_count=12)
    assert plan.det_workers == plan.rec_workers == TENSORRT_CONTEXTS
    assert plan.intra_op_threads == 1


@pytest.mark.parametrize("name", ["CPU_THREADS", "DET_WORKERS", "REC_WORKERS"])
def test_worker_settings_refuse_negative_values(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(env={name: "-1"})
