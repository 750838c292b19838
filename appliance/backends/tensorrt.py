"""TensorRT 10 backend: run a built engine (`tensorrt_build` plans, builds and caches it).

Run (`TensorRTBackend.infer`): `set_input_shape` for the batch, addresses bound once by tensor
name with `set_tensor_address`, `execute_async_v3` on the backend's own stream, copies through
page-locked host buffers (`cuda_buffers`). Several contexts of one engine, each with its own
stream, let the copies of one batch overlap the inference of another (`open_tensorrt_backends`).

`tensorrt` and `pycuda` are imported inside functions: this module imports everywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from appliance.backends.base import (
    BackendError,
    FloatArray,
    InputArray,
    TensorSpec,
    check_batch_size,
)
from appliance.backends.batching import BatchPlan, dims, run_in_pieces, with_batch_axis
from appliance.backends.cuda_buffers import CudaDevice, CudaError, IOBuffers
from appliance.backends.engine_cache import (
    EngineCache,
    EngineCacheError,
)
from appliance.config import Settings
from appliance.models import onnx_graph
from appliance.models.registry import ModelInfo

if TYPE_CHECKING:
    import tensorrt as trt

from appliance.backends.tensorrt_build import (
    ProgressFn,
    TensorRTToolchain,
    engine_builder,
    plan_engine,
)

log = structlog.get_logger("appliance.tensorrt")


class TensorRTBackend:
    """Runs one deserialised engine with buffers for the plan's effective batch; `infer`
    takes up to `batch_plan.configured` images, in pieces where the engine's batch is fixed."""

    def __init__(
        self,
        engine: trt.ICudaEngine,
        info: ModelInfo,
        max_batch: int,
        device: CudaDevice,
        on_close: Callable[[], None] | None = None,
        batch_plan: BatchPlan | None = None,
    ) -> None:
        import tensorrt as trt

        self.name = info.name
        self.info = info
        self._engine = engine
        self._device = device
        self._on_close = on_close
        self._lock = threading.Lock()
        self._closed = False
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_names = [n for n in names if n not in inputs]
        if len(inputs) != 1:
            raise BackendError(f"{info.name}: expected one input, the engine has {len(inputs)}")
        self._input_name = inputs[0]
        low, _opt, top = engine.get_tensor_profile_shape(self._input_name, 0)
        plan = batch_plan or BatchPlan(max_batch, None, max_batch, "dynamic")
        run_batch = plan.effective
        if run_batch > top[0] or plan.min_batch < low[0]:
            raise BackendError(
                f"{info.name}: the engine takes batches {low[0]}..{top[0]}, "
                f"the plan needs {plan.min_batch}..{run_batch}"
            )
        self.batch_plan = plan
        self._max_batch = max_batch
        self._image_shape = dims(top)[1:]
        with device.activate():
            self._context = engine.create_execution_context()
            smallest = self._output_shapes(plan.min_batch)
            at_max = self._output_shapes(run_batch)
        per_image = {n: (1, *s[1:]) if s[0] == plan.min_batch else s for n, s in smallest.items()}
        self._input_dtype = self._dtype(self._input_name)
        self._inputs = [
            TensorSpec(self._input_name, (-1, *self._image_shape), self._input_dtype.name)
        ]
        self._outputs = [
            TensorSpec(n, (-1, *per_image[n][1:]) if per_image[n][0] == 1 else (-1, *per_image[n]))
            for n in self._output_names
        ]
        tensors: dict[str, tuple[tuple[int, ...], Any]] = {
            self._input_name: ((run_batch, *self._image_shape), self._dtype(self._input_name))
        }
        for n in self._output_names:
            tensors[n] = (at_max[n], self._dtype(n))
        try:
            self._buffers = IOBuffers(device, tensors)
        except CudaError as exc:
            raise BackendError(f"{info.name}: {exc}") from None
        for n, buf in self._buffers.buffers.items():
            if not self._context.set_tensor_address(n, buf.device_ptr):
                raise BackendError(f"{info.name}: cannot bind tensor {n}")

    def _dtype(self, name: str) -> np.dtype[Any]:
        import tensorrt as trt

        nptype: Callable[[trt.DataType], type[np.generic]] = trt.nptype
        return np.dtype(nptype(self._engine.get_tensor_dtype(name)))

    def _output_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        shape = (batch, *self._image_shape)
        if not self._context.set_input_shape(self._input_name, shape):
            raise BackendError(f"{self.name}: input shape {shape} is outside the engine's profile")
        return {n: dims(self._context.get_tensor_shape(n)) for n in self._output_names}

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def input_buffer(self, n: int) -> InputArray:
        if n > self.batch_plan.effective:
            # A batch run in pieces is split by `run_in_pieces`; plain memory is enough.
            return np.empty((n, *self._image_shape), self._input_dtype)
        return self._buffers.host_view(self._input_name, n)

    def infer(self, batch: InputArray) -> dict[str, FloatArray]:
        check_batch_size(self.name, batch.shape[0], self._max_batch)
        return run_in_pieces(self._run, batch, self.batch_plan)

    def _run(self, batch: InputArray) -> dict[str, FloatArray]:
        n = batch.shape[0]
        if tuple(batch.shape[1:]) != self._image_shape:
            raise BackendError(
                f"{self.name}: expected images of shape {self._image_shape}, got {batch.shape[1:]}"
            )
        with self._lock:
            if self._closed:
                raise BackendError(f"{self.name}: backend is closed")
            with self._device.activate():
                if not self._context.set_input_shape(self._input_name, tuple(batch.shape)):
                    raise BackendError(f"{self.name}: cannot set input shape {batch.shape}")
                self._buffers.upload(self._input_name, np.ascontiguousarray(batch))
                if not self._context.execute_async_v3(self._buffers.stream.handle):
                    raise BackendError(f"{self.name}: TensorRT execution failed")
                views = {
                    o: self._buffers.download(o, dims(self._context.get_tensor_shape(o)))
                    for o in self._output_names
                }
                self._buffers.synchronize()
                return {
                    o: with_batch_axis(np.array(v, dtype=np.float32), n) for o, v in views.items()
                }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._buffers.close()
            with self._device.activate():
                del self._context
                del self._engine
        if self._on_close is not None:
            self._on_close()


def open_tensorrt_backend(
    settings: Settings,
    info: ModelInfo,
    model_path: Path,
    max_batch: int,
    progress: ProgressFn | None = None,
    input_rewrite: onnx_graph.InputRewrite | None = None,
) -> TensorRTBackend:
    """The backend for one model, building (and caching) its engine first if needed."""
    return open_tensorrt_backends(
        settings, info, model_path, max_batch, 1, progress, input_rewrite
    )[0]


def open_tensorrt_backends(
    settings: Settings,
    info: ModelInfo,
    model_path: Path,
    max_batch: int,
    count: int,
    progress: ProgressFn | None = None,
    input_rewrite: onnx_graph.InputRewrite | None = None,
) -> list[TensorRTBackend]:
    """`count` execution contexts of one engine, each with its own buffers and CUDA stream.

    Driven by one batcher thread each (`DET_WORKERS`, `REC_WORKERS`), the copies of one batch
    overlap the inference of another instead of waiting behind it.
    """
    toolchain = TensorRTToolchain()
    backends: list[TensorRTBackend] = []
    open_count = [count]

    def release() -> None:
        # The toolchain, and so the TensorRT runtime and logger, lives as long as any
        # context: TensorRT requires the runtime to outlive engines it deserialised.
        open_count[0] -= 1
        if open_count[0] == 0:
            toolchain.close()

    try:
        plan = plan_engine(settings, info, model_path, max_batch, toolchain, input_rewrite)
        cache = EngineCache(settings.engines_dir)
        report = progress or (
            lambda message: log.info("engine_progress", model=info.name, step=message)
        )
        result = cache.get_or_build(
            plan.label,
            plan.key,
            engine_builder(cache, plan, toolchain, report),
            toolchain.deserialize,
            on_event=report,
        )
        log.info(
            "engine_built" if result.built else "engine_loaded",
            model=info.name,
            path=str(result.path),
            precision=plan.key.precision,
            max_batch=max_batch,
            effective_batch=plan.batch.effective,
            batch_mode=plan.batch.mode,
            contexts=count,
            seconds=round(result.seconds, 2),
            reason=result.reason or None,
        )
        started = time.monotonic()
        for _ in range(count):
            backends.append(
                TensorRTBackend(
                    result.value,
                    info,
                    max_batch,
                    toolchain.device,
                    on_close=release,
                    batch_plan=plan.batch,
                )
            )
        log.debug("context_ready", model=info.name, seconds=round(time.monotonic() - started, 3))
        return backends
    except BaseException as exc:
        # Contexts made so far release the toolchain as the last of them closes.
        open_count[0] = len(backends)
        for backend in backends:
            backend.close()
        if not backends:
            toolchain.close()
        if isinstance(exc, EngineCacheError):
            raise BackendError(str(exc)) from None
        raise
