"""The one small protocol the pipeline uses to run a model, whatever library runs it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from appliance.backends.batching import BatchPlan

FloatArray = npt.NDArray[np.float32]
# What `infer` takes: uint8 (N, H, W, 3) pixels for models loaded with an input rewrite
# (`onnx_graph.InputRewrite`, what the loader always does), float32 NCHW otherwise.
InputArray = npt.NDArray[Any]


class BackendError(RuntimeError):
    """A backend could not be created or could not run a batch."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input or output.

    A dimension that is not fixed by the model is `-1` (the batch dimension of a dynamic-batch
    model, for example).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


def check_batch_size(name: str, n: int, max_batch: int) -> None:
    """Refuse a batch the backend was not built for (engines have a fixed profile max)."""
    if not 1 <= n <= max_batch:
        raise BackendError(f"{name}: batch of {n} outside 1..{max_batch}")


@runtime_checkable
class InferenceBackend(Protocol):
    """A loaded model that turns a batch (`inputs[0]`'s shape and dtype) into named outputs.

    `outputs` is in the model's declared order; the registry maps that order to meaning
    (for SCRFD: scores s8, s16, s32, boxes s8.., keypoints s8..). `infer` accepts any batch
    size from 1 to `max_batch` and returns arrays whose first dimension is that batch size,
    also for models whose raw outputs have no batch dimension.
    """

    name: str

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    @property
    def max_batch(self) -> int: ...

    # How the configured batch meets the model's own batch dimension (`batching.BatchPlan`).
    batch_plan: BatchPlan

    def infer(self, batch: InputArray) -> dict[str, FloatArray]: ...

    def input_buffer(self, n: int) -> InputArray:
        """A writable (n, ...) array `infer` reads without another copy when given it back
        (the page-locked host buffer on TensorRT). Only the caller that asked may use it until
        its `infer` returns; each backend is driven by one thread at a time."""
        ...

    def close(self) -> None: ...
