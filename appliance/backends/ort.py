"""ONNX Runtime backend: CPU everywhere, CUDA or TensorRT execution providers where installed."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from appliance.backends.base import (
    BackendError,
    FloatArray,
    InputArray,
    TensorSpec,
    check_batch_size,
)
from appliance.backends.batching import BatchPlan, dims, plan_batch, run_in_pieces, with_batch_axis
from appliance.models import onnx_graph
from appliance.models.registry import ModelInfo

# Preferred first; only those the installed onnxruntime build offers are used.
PROVIDER_PREFERENCE = ("CUDAExecutionProvider", "CPUExecutionProvider")


@functools.cache
def shared_cpu_arena() -> None:
    """Register one CPU arena with ONNX Runtime's environment, once per process.

    The adaptive default opens three sessions per model (`backends.threads`); with an arena
    each they held ~100 MB more on the real models (docs/BENCHMARKS.md, "Adaptive
    sessions"). The environment is ONNX Runtime's own process-wide state, so the cache is
    too: registering again installs a fresh arena for the sessions opened after it, which
    is just what sharing is meant to avoid.
    """
    import onnxruntime as ort

    ort.create_and_register_allocator(
        ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        ),
        ort.OrtArenaCfg(0, -1, -1, -1),
    )


class OnnxRuntimeBackend:
    """Runs one ONNX model; a fixed-batch model is made dynamic or run in pieces (`batching`)."""

    def __init__(
        self,
        model_path: Path,
        info: ModelInfo,
        max_batch: int,
        intra_op_threads: int | None = None,
        image_shape: tuple[int, int, int] | None = None,
        input_rewrite: onnx_graph.InputRewrite | None = None,
    ) -> None:
        import onnxruntime as ort

        if not model_path.is_file():
            raise BackendError(f"model file {model_path} does not exist")
        self.name = info.name
        self.info = info
        try:
            model = onnx_graph.load(model_path)
        except Exception as exc:
            raise BackendError(f"{model_path} is not a readable ONNX model: {exc}") from None
        self._max_batch = max_batch
        chw = image_shape or info.input_shape
        model, self.batch_plan = plan_batch(model, max_batch, chw)
        self.input_rewrite = input_rewrite
        if input_rewrite is not None:
            try:
                model = onnx_graph.prepend_input_conversion(model, input_rewrite)
            except ValueError as exc:
                raise BackendError(f"{model_path}: cannot take uint8 input: {exc}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
        self.intra_op_threads = options.intra_op_num_threads
        options.log_severity_level = 3
        # Idle intra-op threads otherwise spin for a while after each run, taking the cores
        # that image decoding and post-processing need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Every session of the process draws from one CPU arena instead of growing its own
        # (`shared_cpu_arena`).
        shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
        available = set(ort.get_available_providers())
        self.providers = [p for p in PROVIDER_PREFERENCE if p in available] or [
            "CPUExecutionProvider"
        ]
        try:
            self._session = ort.InferenceSession(
                model.SerializeToString(), sess_options=options, providers=self.providers
            )
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot load {model_path}: {exc}") from None
        dtype = "float32" if input_rewrite is None else "uint8"
        self._inputs = [
            TensorSpec(i.name, (-1, *dims(i.shape)[1:]), dtype) for i in self._session.get_inputs()
        ]
        self._outputs = [
            TensorSpec(o.name, dims(o.shape), "float32") for o in self._session.get_outputs()
        ]
        if len(self._inputs) != 1:
            raise BackendError(f"{model_path}: expected one input, found {len(self._inputs)}")
        self._input_name = self._inputs[0].name
        self._dtype = np.dtype(dtype)
        declared = self._inputs[0].shape[1:]
        wanted = chw if input_rewrite is None else (chw[1], chw[2], chw[0])
        self._image_shape = tuple(d if d > 0 else w for d, w in zip(declared, wanted, strict=True))
        # Filled by the batcher in place (`input_buffer`), at the image shape the factory
        # gave for dimensions the model leaves open (MAX_SIZE for a detector).
        self._buffer: InputArray = np.empty((0,), self._dtype)

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
        if self._buffer.ndim == 1 or self._buffer.shape[0] < n:
            self._buffer = np.empty((max(n, self._max_batch), *self._image_shape), self._dtype)
        return self._buffer[:n]

    def _run(self, batch: InputArray) -> dict[str, FloatArray]:
        n = batch.shape[0]
        results = self._session.run(
            None, {self._input_name: np.ascontiguousarray(batch, self._dtype)}
        )
        return {
            spec.name: with_batch_axis(np.asarray(value, dtype=np.float32), n)
            for spec, value in zip(self._outputs, results, strict=True)
        }

    def infer(self, batch: InputArray) -> dict[str, FloatArray]:
        check_batch_size(self.name, batch.shape[0], self._max_batch)
        return run_in_pieces(self._run, batch, self.batch_plan)

    def close(self) -> None:
        del self._session


__all__ = ["BatchPlan", "OnnxRuntimeBackend"]
