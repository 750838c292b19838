"""Locate, verify and open the detector and recognizer the settings name.

Blocking (file hashing, graph parsing, engine builds): call `load_models` from a thread.
`build_analyzer` puts what it returns behind the two batchers and a `FaceAnalyzer`, the same
way for the server and for the commands that analyse without it.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import structlog

from appliance.backends.base import BackendError, InferenceBackend
from appliance.backends.cores import CoreGate
from appliance.backends.factory import ResolvedBackend, choose_backend, open_pool
from appliance.backends.pool import BackendPool
from appliance.backends.threads import ModelThreads, ThreadPlan, plan_threads
from appliance.config import Settings
from appliance.models import onnx_graph
from appliance.models.registry import (
    ModelInfo,
    ModelRegistry,
    RegistryError,
    model_names,
)
from appliance.pipeline.batcher import Demand, DynamicBatcher
from appliance.pipeline.faces import FaceAnalyzer, ModelSlot

log = structlog.get_logger("appliance.models.loader")

RECOGNIZER_INPUT = (112, 112)


class ModelLoadError(RuntimeError):
    """A model cannot be located, verified or opened; the message says what to fix."""


@dataclasses.dataclass
class LoadedModel:
    info: ModelInfo
    path: Path
    backend: BackendPool
    normalizes_input: bool
    sha256: str
    # (width, height) the analyzer feeds the model.
    input_size: tuple[int, int]
    threads: ModelThreads

    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.backend.outputs)

    def embedding_size(self) -> int | None:
        """Length of the recognizer's embedding, from its declared output shape."""
        shape = self.backend.outputs[0].shape
        size = 1
        for d in shape[1:]:
            if d < 1:
                return None
            size *= d
        return size

    def slot(self, batcher: DynamicBatcher) -> ModelSlot:
        return ModelSlot(
            self.info, batcher, self.output_names(), self.input_size, self.normalizes_input
        )

    def describe(self) -> dict[str, Any]:
        """The model as /info shows it."""
        facts: dict[str, Any] = {
            "name": self.info.name,
            "family": self.info.family,
            "file": str(self.path),
            "sha256": self.sha256,
            "checksum": self.info.checksum,
            "input_size": list(self.input_size),
            "max_batch": self.backend.max_batch,
            "workers": self.backend.workers,
            # ONNX Runtime's adaptive default: the threads of the session a run gets when it
            # finds every core free (0: every run on one of the `workers` sessions).
            "wide_session_threads": self.threads.wide_threads,
            "input": "uint8 NHWC BGR; colour order, mean/std and NCHW run in the graph",
            "normalizes_input": self.normalizes_input,
            "rgb": self.info.default_preprocess.rgb,
            "mean": self.info.default_preprocess.mean,
            "std": self.info.default_preprocess.std,
            **self.backend.batch_plan.describe(),
        }
        if self.info.family == "arcface":
            facts["embedding_size"] = self.embedding_size()
        return facts

    def close(self) -> None:
        self.backend.close()


@dataclasses.dataclass
class LoadedModels:
    backend: ResolvedBackend
    backend_reason: str
    detector: LoadedModel
    recognizer: LoadedModel
    threads: ThreadPlan

    def close(self) -> None:
        self.detector.close()
        self.recognizer.close()


def locate_model(
    settings: Settings, registry: ModelRegistry, name: str
) -> tuple[ModelInfo, Path, str]:
    """The model's verified file and its sha256; raises ModelLoadError with the fix when it is
    missing or bad. The verification already hashes the file: its sha256 is reused for /info."""
    info = registry.get(name)
    if settings.demo_models:
        path = settings.models_dir / info.file
        return info, path, onnx_graph.sha256_file(path)
    from appliance.models.store import ModelStore, ModelStoreError

    store = ModelStore(settings.models_dir, registry, trust_unverified=settings.trust_unverified)
    try:
        result = store.require_verified(name)
    except ModelStoreError as exc:
        raise ModelLoadError(str(exc)) from None
    assert result.sha256 is not None  # computed for every present file
    return info, result.path, result.sha256


def normalizes_input(info: ModelInfo, path: Path) -> bool:
    """The registry's answer, else the graph's, read as InsightFace reads it."""
    if info.normalizes_input is not None:
        return info.normalizes_input
    # Only read the graph when the registry does not already know the answer: a large
    # recognizer takes seconds to parse on the Orin's CPU.
    return onnx_graph.normalizes_input(onnx_graph.load(path))


def input_rewrite(info: ModelInfo, normalizes: bool) -> onnx_graph.InputRewrite:
    """The conversion prepended to the graph: the registry's colour order and mean/std, none of
    the scaling where the graph normalises its input itself."""
    pre = info.default_preprocess
    if normalizes:
        return onnx_graph.InputRewrite(rgb=pre.rgb, mean=0.0, std=1.0)
    return onnx_graph.InputRewrite(rgb=pre.rgb, mean=pre.mean, std=pre.std)


def detector_input_size(settings: Settings, backend: InferenceBackend) -> tuple[int, int]:
    # (N, H, W, 3): the loader always prepends the uint8 NHWC conversion.
    shape = backend.inputs[0].shape
    height, width = shape[1], shape[2]
    if height > 0 and width > 0 and (width, height) != settings.max_size:
        raise ModelLoadError(
            f"MAX_SIZE is {settings.max_size[0]},{settings.max_size[1]} but the detector "
            f"{backend.name} has a fixed {width}x{height} input; set MAX_SIZE={width},{height}"
        )
    return settings.max_size


def load_model(
    kind: ResolvedBackend,
    settings: Settings,
    info: ModelInfo,
    path: Path,
    sha256: str,
    max_batch: int,
    threads: ModelThreads,
    gate: CoreGate | None = None,
) -> LoadedModel:
    normalizes = normalizes_input(info, path)
    rewrite = input_rewrite(info, normalizes)
    try:
        backend = open_pool(kind, settings, info, path, max_batch, threads, rewrite, gate)
    except BackendError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        size = (
            detector_input_size(settings, backend) if info.family == "scrfd" else RECOGNIZER_INPUT
        )
    except BaseException:
        backend.close()
        raise
    plan = backend.batch_plan
    log.info(
        "model_batch_planned",
        model=info.name,
        configured_batch=plan.configured,
        effective_batch=plan.effective,
        batch_mode=plan.mode,
        reason=plan.reason,
        workers=threads.workers,
        wide_threads=threads.wide_threads,
        input_rewrite=rewrite.describe(),
    )
    return LoadedModel(info, path, backend, normalizes, sha256, size, threads)


def load_models(settings: Settings) -> LoadedModels:
    """Both models, verified and opened; raises ModelLoadError with the fix."""
    det_name, rec_name = model_names(settings)
    if settings.demo_models:
        from appliance.models.demo import build_demo_models

        build_demo_models(settings.models_dir, settings.max_size)
    try:
        registry = ModelRegistry.load(settings.override_file)
        registry.selected(det_name, rec_name)  # names and families, before hashing any file
        det_info, det_path, det_sha = locate_model(settings, registry, det_name)
        rec_info, rec_path, rec_sha = locate_model(settings, registry, rec_name)
    except RegistryError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        kind, reason = choose_backend(settings)
    except BackendError as exc:
        raise ModelLoadError(str(exc)) from None
    threads = plan_threads(settings, kind)
    log.info("backend_chosen", backend=kind, reason=reason, **threads.describe())
    apply_opencv_threads(threads)
    # One gate for both models: a detector run and a recognizer run share the same cores.
    gate = CoreGate(threads.cpu_threads) if threads.adaptive else None
    det = load_model(
        kind,
        settings,
        det_info,
        det_path,
        det_sha,
        settings.det_batch_size,
        threads.det,
        gate,
    )
    try:
        rec = load_model(
            kind,
            settings,
            rec_info,
            rec_path,
            rec_sha,
            settings.rec_batch_size,
            threads.rec,
            gate,
        )
    except BaseException:
        det.close()
        raise
    return LoadedModels(kind, reason, det, rec, threads)


def apply_opencv_threads(threads: ThreadPlan) -> None:
    """OpenCV's thread pool is per process: set once, when the models load."""
    import cv2

    cv2.setNumThreads(threads.opencv_threads)


class BatchMetrics(Protocol):
    """What the batchers report (the API's `Metrics` has this shape; models/ knows no API)."""

    def observe_batch(self, model: str, tags: list[str], seconds: float) -> None: ...

    def observe_submission(self, model: str, tag: str) -> None: ...


@dataclasses.dataclass
class ServingAnalyzer:
    """A `FaceAnalyzer` on its two batchers and its pre/post-processing executor. Its batchers'
    threads run from `start` to `stop`; the models stay open (`LoadedModels.close`)."""

    analyzer: FaceAnalyzer
    detector: DynamicBatcher
    recognizer: DynamicBatcher
    executor: ThreadPoolExecutor

    def start(self) -> None:
        self.detector.start()
        self.recognizer.start()

    async def stop(self) -> None:
        await self.detector.stop()
        await self.recognizer.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)


def build_analyzer(
    loaded: LoadedModels, settings: Settings, metrics: BatchMetrics | None = None
) -> ServingAnalyzer:
    """The batchers and the analyzer on `loaded`, not yet started (no thread runs until
    `start`, so a failure here leaves nothing behind but the executor's idle pool)."""

    def batcher(name: str, model: LoadedModel) -> DynamicBatcher:
        return DynamicBatcher(
            name,
            model.backend.infer,
            model.backend.max_batch,
            settings.batch_window_ms,
            settings.max_queue,
            None if metrics is None else (lambda tags, s: metrics.observe_batch(name, tags, s)),
            None if metrics is None else (lambda tag, _n: metrics.observe_submission(name, tag)),
            demand,
        )

    # One count of analyses for both batchers: a lone request's runs may take every core.
    demand = Demand()

    det = batcher("detector", loaded.detector)
    rec = batcher("recognizer", loaded.recognizer)
    # Sized from the process's one thread budget (CPU_THREADS, `backends.threads`), known once
    # the backend is chosen: a pool per core beside ONNX Runtime's own threads would
    # oversubscribe the cores.
    executor = ThreadPoolExecutor(
        max_workers=loaded.threads.executor_threads, thread_name_prefix="cpu"
    )
    analyzer = FaceAnalyzer(
        loaded.detector.slot(det),
        loaded.recognizer.slot(rec),
        executor,
        nms_threshold=settings.nms_threshold,
        demand=demand,
    )
    return ServingAnalyzer(analyzer, det, rec, executor)
