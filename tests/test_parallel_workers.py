"""Several model sessions behind one batcher, and the one CPU thread budget."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.backends.base import BackendError, FloatArray, InputArray
from appliance.backends.cores import CoreGate
from appliance.backends.ort import OnnxRuntimeBackend
from appliance.backends.pool import BackendPool
from appliance.backends.threads import TENSORRT_CONTEXTS, ModelThreads, plan_threads
from appliance.config import ConfigError, load_settings
from appliance.models import onnx_graph
from appliance.models.loader import build_analyzer, load_models
from appliance.models.registry import ModelRegistry
from appliance.pipeline.batcher import Demand, DynamicBatcher
from appliance.pipeline.faces import AnalyzeOptions, FaceAnalyzer
from tests.golden import real_settings
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


def recognizer(real_models: Path, threads: int = 1) -> OnnxRuntimeBackend:
    info = ModelRegistry.load(real_models / "none.json").get(REAL_RECOGNIZER)
    pre = info.default_preprocess
    return OnnxRuntimeBackend(
        real_models / f"{REAL_RECOGNIZER}.onnx",
        info,
        max_batch=2,
        intra_op_threads=threads,
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


def test_thread_budget_onnx_defaults_to_adaptive_sessions_on_every_core() -> None:
    plan = plan_threads(load_settings(env={}), "onnx", cpu_count=2)
    assert plan.cpu_threads == 2 and plan.adaptive
    # Per model: a single-thread session per core, and one with a thread per core.
    assert plan.det == plan.rec == ModelThreads(workers=2, intra_op_threads=1, wide_threads=2)
    assert plan.opencv_threads == 1 and plan.executor_threads == 2
    assert plan.describe()["det_wide_threads"] == 2


def test_thread_budget_of_one_core_has_nothing_to_adapt() -> None:
    plan = plan_threads(load_settings(env={"CPU_THREADS": "1"}), "onnx", cpu_count=8)
    assert plan.det == plan.rec == ModelThreads(1, 1, 0) and not plan.adaptive


def test_thread_budget_splits_cores_between_fixed_sessions() -> None:
    settings = load_settings(env={"DET_WORKERS": "2", "REC_WORKERS": "2"})
    plan = plan_threads(settings, "onnx", cpu_count=2)
    assert plan.det == plan.rec == ModelThreads(2, 1, 0) and not plan.adaptive


def test_thread_budget_follows_cpu_threads_and_explicit_workers_per_model() -> None:
    settings = load_settings(env={"CPU_THREADS": "8", "DET_WORKERS": "1", "REC_WORKERS": "2"})
    plan = plan_threads(settings, "onnx", cpu_count=2)
    assert plan.cpu_threads == 8 and plan.executor_threads == 8
    # Each model splits the budget between its own sessions.
    assert plan.det == ModelThreads(1, 8, 0) and plan.rec == ModelThreads(2, 4, 0)
    # One model fixed, the other left to adapt.
    half = plan_threads(load_settings(env={"DET_WORKERS": "1"}), "onnx", cpu_count=4)
    assert half.det == ModelThreads(1, 4, 0) and half.rec == ModelThreads(4, 1, 4)
    assert half.adaptive


def test_thread_budget_on_tensorrt_uses_contexts_not_cpu_threads() -> None:
    plan = plan_threads(load_settings(env={}), "trt", cpu_count=12)
    assert plan.det == plan.rec == ModelThreads(TENSORRT_CONTEXTS, 1, 0)
    assert not plan.adaptive


@pytest.mark.parametrize("name", ["CPU_THREADS", "DET_WORKERS", "REC_WORKERS"])
def test_worker_settings_refuse_negative_values(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(env={name: "-1"})


def hold(
    gate: CoreGate, alone: bool, got: list[bool], entered: threading.Event, leave: threading.Event
) -> threading.Thread:
    """A thread that claims from `gate`, records what it got, and holds it until `leave`."""

    def run() -> None:
        with gate.claim(alone) as wide:
            got.append(wide)
            entered.set()
            leave.wait(5)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_core_gate_gives_every_core_only_to_a_run_alone() -> None:
    gate = CoreGate(2)
    got: list[bool] = []
    entered, leave = threading.Event(), threading.Event()
    first = hold(gate, True, got, entered, leave)
    assert entered.wait(5) and got == [True] and gate.free == 0
    # A second run while the wide one holds every core waits, then gets one core: it was
    # not alone (someone held cores when it came).
    second_in, second_leave = threading.Event(), threading.Event()
    second = hold(gate, True, got, second_in, second_leave)
    assert not second_in.wait(0.2)
    leave.set()
    first.join(5)
    assert second_in.wait(5) and got == [True, False] and gate.free == 1
    # Alone, but a core is held: one core.
    with gate.claim(True) as wide:
        assert wide is False and gate.free == 0
    second_leave.set()
    second.join(5)
    assert gate.free == 2 and (gate.wide_runs, gate.narrow_runs) == (1, 2)


def test_core_gate_never_runs_more_single_core_runs_than_cores() -> None:
    gate = CoreGate(2)
    got: list[bool] = []
    leave = threading.Event()
    events = [threading.Event() for _ in range(3)]
    threads = [hold(gate, False, got, e, leave) for e in events]
    time.sleep(0.3)
    assert sum(e.is_set() for e in events) == 2 and gate.free == 0
    # A run alone in its own queue still waits behind a waiting run, and then gets one core.
    late_in = threading.Event()
    late = hold(gate, True, got, late_in, leave)
    assert not late_in.wait(0.2)
    leave.set()
    for thread in [*threads, late]:
        thread.join(5)
    assert got == [False] * 4 and gate.free == 2


class Concurrency:
    """The most runs in flight at once across several `Counted` sessions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


class Tracked(Counted):
    def __init__(self, backend: OnnxRuntimeBackend, concurrency: Concurrency) -> None:
        super().__init__(backend)
        self.concurrency = concurrency

    def infer(self, batch: InputArray) -> dict[str, FloatArray]:
        self.concurrency.enter()
        try:
            time.sleep(0.005)  # long enough for runs to overlap if the gate let them
            return super().infer(batch)
        finally:
            self.concurrency.leave()


async def test_adaptive_pool_runs_a_lone_item_wide_and_a_queue_one_core_each(
    real_models: Path,
) -> None:
    rng = np.random.default_rng(5)
    crops = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(24)]
    single = recognizer(real_models)
    expected = [single.infer(c[None])["output0"][0] for c in crops]
    concurrency = Concurrency()
    members = [Tracked(recognizer(real_models), concurrency) for _ in range(2)]
    wide = Tracked(recognizer(real_models, threads=2), concurrency)
    gate = CoreGate(2)
    pool = BackendPool(members, wide=wide, gate=gate)
    batcher = DynamicBatcher("recognizer", pool.infer, max_batch=2, window_ms=0, max_queue=64)
    batcher.start()
    try:
        lone = await batcher.submit(crops[0])
        assert (wide.calls, members[0].calls, members[1].calls) == (1, 0, 0)
        results = await asyncio.gather(*(batcher.submit(c) for c in crops))
    finally:
        await batcher.stop()
        pool.close()
    np.testing.assert_allclose(lone["output0"], expected[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got["output0"], want, rtol=1e-5, atol=1e-5)
    # The queue ran on the single-thread sessions, both of them, never more runs than cores.
    assert members[0].calls > 0 and members[1].calls > 0
    assert concurrency.most == 2
    assert gate.narrow_runs == members[0].calls + members[1].calls
    assert gate.wide_runs == wide.calls and gate.free == 2


def test_a_wide_session_without_a_gate_is_refused(real_models: Path) -> None:
    with pytest.raises(BackendError, match="core gate"):
        BackendPool([recognizer(real_models)], wide=recognizer(real_models, threads=2))


def test_loader_opens_adaptive_sessions_by_default_and_says_so(real_models: Path) -> None:
    loaded = load_models(real_settings(real_models, cpu_threads=2))
    try:
        for model in (loaded.detector, loaded.recognizer):
            pool = model.backend
            assert pool.workers == 2 and pool.wide is not None and pool.gate is not None
            assert [m.intra_op_threads for m in pool.members] == [1, 1]  # type: ignore[attr-defined]
            assert pool.wide.intra_op_threads == 2  # type: ignore[attr-defined]
            assert model.describe()["wide_session_threads"] == 2
        # One gate for both models: their runs share the same two cores.
        assert loaded.detector.backend.gate is loaded.recognizer.backend.gate
        assert loaded.detector.backend.gate.cores == 2  # type: ignore[union-attr]
    finally:
        loaded.close()


async def test_a_run_alone_in_its_queue_goes_wide_only_while_one_analysis_runs(
    real_models: Path,
) -> None:
    concurrency = Concurrency()
    members = [Tracked(recognizer(real_models), concurrency) for _ in range(2)]
    wide = Tracked(recognizer(real_models, threads=2), concurrency)
    pool = BackendPool(members, wide=wide, gate=CoreGate(2))
    demand = Demand()
    batcher = DynamicBatcher(
        "recognizer", pool.infer, max_batch=2, window_ms=0, max_queue=8, demand=demand
    )
    crop = np.full((112, 112, 3), 90, np.uint8)
    batcher.start()
    try:
        release, entered = asyncio.Event(), asyncio.Event()

        async def other_analysis() -> None:
            with demand.analysis():
                entered.set()
                await release.wait()

        other = asyncio.create_task(other_analysis())
        await entered.wait()
        with demand.analysis():
            assert demand.active == 2
            # Two analyses: the other's runs are coming, so this one takes one core.
            await batcher.submit(crop)
            assert (wide.calls, members[0].calls + members[1].calls) == (0, 1)
            release.set()
            await other
            assert demand.active == 1
            await batcher.submit(crop)
            assert wide.calls == 1
        assert demand.active == 0
    finally:
        await batcher.stop()
        pool.close()


class DemandSeen:
    """`BatchMetrics` that records how many analyses were running at each detector batch."""

    def __init__(self) -> None:
        self.analyzer: FaceAnalyzer | None = None
        self.seen: list[int] = []

    def observe_batch(self, model: str, tags: list[str], seconds: float) -> None:
        if model == "detector" and self.analyzer is not None:
            self.seen.append(self.analyzer.demand.active)

    def observe_submission(self, model: str, tag: str) -> None:
        pass


async def test_served_analyses_are_counted_for_the_batchers(
    real_models: Path, photos: Path
) -> None:
    settings = real_settings(real_models, cpu_threads=2)
    loaded = load_models(settings)
    seen = DemandSeen()
    serving = build_analyzer(loaded, settings, seen)
    seen.analyzer = serving.analyzer
    gate = loaded.detector.backend.gate
    assert gate is not None
    pixels = np.asarray(cv2.imread(str(photos / "t1.jpg")), dtype=np.uint8)
    serving.start()
    try:
        faces = (await serving.analyzer.analyze(pixels, AnalyzeOptions())).faces
        assert len(faces) == 6 and seen.seen == [1]
        # The lone request's detector run had both cores.
        assert gate.wide_runs >= 1
        await asyncio.gather(
            *(serving.analyzer.analyze(pixels, AnalyzeOptions()) for _ in range(3))
        )
        # All three were counted before any reached the detector.
        assert seen.seen[1] == 3 and serving.analyzer.demand.active == 0
    finally:
        await serving.stop()
        loaded.close()


async def test_one_analysis_counts_once_however_deeply_it_enters() -> None:
    demand = Demand()
    inside: list[int] = []

    async def image_of_request() -> None:
        with demand.analysis():  # the analyzer's own entry, in a task the request started
            await asyncio.sleep(0.01)
            inside.append(demand.active)

    async def request() -> None:
        with demand.analysis():  # the API's entry, before decoding
            await asyncio.gather(image_of_request(), image_of_request())

    await request()
    assert inside == [1, 1] and demand.active == 0
    inside.clear()
    await asyncio.gather(request(), request(), request())
    assert inside == [3] * 6 and demand.active == 0
