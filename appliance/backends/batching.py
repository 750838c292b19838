"""How a model's batch dimension meets the configured batch size, for every backend.

Real exports often fix the batch at 1 (MobileFaceNet, InsightFace's SCRFD). InsightFace-REST
rewrites the input's batch dimension to a symbolic one before building engines; that only
works where no node bakes the batch into a constant (a `Reshape` to `[1, -1]` folds a batch of
four into one row of four embeddings, and SCRFD's head reshapes interleave images). A graph's
text cannot tell the two apart reliably, so the rewrite is tried and proved: ONNX Runtime runs
the rewritten graph on two random images at once and on each alone, and the rewrite is kept
only when the results agree. Otherwise the backend runs the batch in pieces of the size the
model accepts, padding the last piece for a fixed batch above 1. Either way a configured batch
never fails a request; the chosen way is reported at start-up and in /info.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import numpy as np
import onnx

from appliance.backends.base import FloatArray, InputArray
from appliance.models import onnx_graph

BatchMode = Literal["dynamic", "rewritten", "pieces", "fixed"]
# Agreement needed between a batched run and single runs of the rewritten graph; float32
# reduction order differs with the batch, real faults are orders of magnitude larger.
PROBE_RTOL = 1e-3
PROBE_ATOL = 1e-4


class _Indexable(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> object: ...


def dims(shape: _Indexable | Sequence[object]) -> tuple[int, ...]:
    """A shape as ints, `-1` for every dimension the model leaves open.

    Accepts ONNX Runtime's shapes (ints, names or None) and TensorRT's `Dims` (ints, -1).
    """
    out = []
    for i in range(len(shape)):
        d = shape[i]
        out.append(int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else -1)
    return tuple(out)


def with_batch_axis(arr: FloatArray, n: int) -> FloatArray:
    """Give an output without a batch axis one, as the backend protocol promises.

    Exports without a batch dimension on their outputs return (N * A, K): (N, A, K) lets
    callers always index [i]. Outputs that already lead with N are returned as they are.
    """
    if arr.ndim >= 2 and arr.shape[0] == n:
        return arr
    if arr.ndim >= 2:
        return arr.reshape(n, -1, arr.shape[-1])
    return arr.reshape(n, -1)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """What the backend does with a configured batch size, for start-up logs and /info.

    `configured`: the batch size asked for (DET_BATCH_SIZE, REC_BATCH_SIZE), the most items
    one `infer` call accepts. `model_batch`: the batch the file fixes, None when dynamic.
    `effective`: the most images one model run takes. `mode`: `dynamic` (the file accepts any
    batch), `rewritten` (the file's fixed batch was made dynamic and proved), `pieces` (runs
    of `effective` images), `fixed` (the configured batch is the file's own).
    """

    configured: int
    model_batch: int | None
    effective: int
    mode: BatchMode
    reason: str = ""

    def describe(self) -> dict[str, object]:
        return {
            "configured_batch": self.configured,
            "effective_batch": self.effective,
            "model_batch": self.model_batch,
            "batch_mode": self.mode,
            "batch_reason": self.reason,
        }

    @property
    def min_batch(self) -> int:
        """The smallest batch the session or engine runs (a fixed batch is always full)."""
        return self.effective if self.mode in ("pieces", "fixed") else 1


Run = Callable[[InputArray], dict[str, FloatArray]]


def run_in_pieces(run: Run, batch: InputArray, plan: BatchPlan) -> dict[str, FloatArray]:
    """Run `batch` through `run` in model-sized pieces and stitch the outputs together.

    A fixed batch above 1 takes only full batches: the last piece is padded with zeros and
    the padding's outputs dropped.
    """
    n = batch.shape[0]
    if plan.mode not in ("pieces", "fixed"):
        return run(batch)
    size = plan.effective
    parts: dict[str, list[FloatArray]] = {}
    for start in range(0, n, size):
        piece = batch[start : start + size]
        used = piece.shape[0]
        if used < size:
            pad = np.zeros((size - used, *piece.shape[1:]), dtype=piece.dtype)
            piece = np.concatenate([piece, pad])
        for name, value in run(piece).items():
            parts.setdefault(name, []).append(with_batch_axis(value, size)[:used])
    return {name: np.concatenate(values) for name, values in parts.items()}


def _probe_rewrite(model: onnx.ModelProto, image_shape: tuple[int, int, int]) -> str | None:
    """None when the rewritten graph batches correctly, else why not."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # the mismatch being probed for would log warnings
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        rng = np.random.default_rng(0)
        pair = rng.uniform(-1.0, 1.0, (2, *image_shape)).astype(np.float32)
        both = session.run(None, {name: pair})
        alone = [session.run(None, {name: pair[i : i + 1]}) for i in range(2)]
    except Exception as exc:  # ONNX Runtime raises its own exception types per failure
        return f"the graph fails with a batch of 2 ({str(exc).splitlines()[0][:200]})"
    for k, value in enumerate(both):
        singles = [np.asarray(a[k]) for a in alone]
        got = np.asarray(value)
        # The batch must stay on the leading axis: (2, K) for (1, K), or (2A, K) for (A, K)
        # where outputs have no batch axis. A graph that folds it into the features (a
        # reshape to [1, -1] gives (1, 2K)) holds the right numbers in the wrong place.
        if got.ndim == 0 or got.shape != (2 * singles[0].shape[0], *singles[0].shape[1:]):
            return (
                f"a batch of 2 gives output {k} the shape {got.shape} for "
                f"{singles[0].shape} per image (the graph fixes the batch)"
            )
        if not np.allclose(got, np.concatenate(singles), rtol=PROBE_RTOL, atol=PROBE_ATOL):
            return f"a batch of 2 gives other values than two single runs (output {k})"
    return None


def plan_batch(
    model: onnx.ModelProto, configured: int, image_shape: tuple[int, int, int]
) -> tuple[onnx.ModelProto, BatchPlan]:
    """The graph to run and the plan for it, for `configured` images per call.

    `image_shape` is (C, H, W) of one image, used for dimensions the model leaves open.
    """
    if configured < 1:
        raise ValueError(f"batch size must be >= 1, got {configured}")
    shape = onnx_graph.input_shape(model)
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if fixed is None:
        return model, BatchPlan(
            configured, None, configured, "dynamic", "the model's batch is dynamic"
        )
    if fixed == configured:
        return model, BatchPlan(
            configured, fixed, fixed, "fixed", "the configured batch is the model's"
        )
    rewritten = onnx_graph.make_batch_dynamic(model)
    why_not = _probe_rewrite(rewritten, image_shape)
    if why_not is None:
        return rewritten, BatchPlan(
            configured,
            fixed,
            configured,
            "rewritten",
            f"batch dimension rewritten from {fixed} to dynamic (proved on a batch of 2)",
        )
    return model, BatchPlan(
        configured, fixed, fixed, "pieces", f"runs in pieces of {fixed}: {why_not}"
    )
