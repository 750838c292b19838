"""ONNX Runtime backend: CPU everywhere, CUDA or TensorRT execution providers where installed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from appliance.backends.base import BackendError, FloatArray, TensorSpec, check_batch_size
from appliance.models import onnx_graph
from appliance.models.registry import ModelInfo

# Preferred first; only those the installed onnxruntime build offers are used.
PROVIDER_PREFERENCE = ("CUDAExecutionProvider", "CPUExecutionProvider")


def _dims(shape: list[int | str | None]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)


class OnnxRuntimeBackend:
    """Runs one ONNX model. Models with a fixed batch of 1 are rewritten to a dynamic batch."""

    def __init__(
        self,
        model_path: Path,
        info: ModelInfo,
        max_batch: int,
        intra_op_threads: int | None = None,
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
        if not onnx_graph.has_dynamic_batch(model):
            model = onnx_graph.make_batch_dynamic(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
        options.log_severity_level = 3
        # Idle intra-op threads otherwise spin for a while after each run, taking the cores
        # that image decoding and post-processing need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        self._inputs = [
            TensorSpec(i.name, _dims(i.shape), "float32") for i in self._session.get_inputs()
        ]
        self._outputs = [
            TensorSpec(o.name, _dims(o.shape), "float32") for o in self._session.get_outputs()
        ]
        if len(self._inputs) != 1:
            raise BackendError(f"{model_path}: expected one input, found {len(self._inputs)}")
        self._input_name = self._inputs[0].name

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def infer(self, batch: FloatArray) -> dict[str, FloatArray]:
        n = batch.shape[0]
        check_batch_size(self.name, n, self._max_batch)
        results = self._session.run(
            None, {self._input_name: np.ascontiguousarray(batch, np.float32)}
        )
        out: dict[str, FloatArray] = {}
        for spec, value in zip(self._outputs, results, strict=True):
            arr = np.asarray(value, dtype=np.float32)
            # Exports without a batch dimension on their outputs return (N * A, K): give each
            # image its own leading axis so callers always index [i].
            if arr.ndim < 2 or arr.shape[0] != n:
                arr = arr.reshape(n, -1, arr.shape[-1]) if arr.ndim >= 2 else arr.reshape(n, -1)
            out[spec.name] = arr
        return out

    def close(self) -> None:
        del self._session
