"""`appliance check`: prove the TensorRT engines give what ONNX Runtime gives.

Both backends run the same deterministic batch (a full batch of DET_BATCH_SIZE / REC_BATCH_SIZE
images, seeded pseudo-random pixels normalised as the model expects). For the detector it
reports the largest absolute difference of every output; for the recogniser the cosine
between each pair of embeddings. An FP16 engine is faithful when every cosine is above 0.99
(`--min-cosine`) and no detector output differs by more than 0.05 (`--max-det-diff`; scores
are probabilities, boxes and keypoints distances in anchor strides).

Exit codes: 0 faithful; 1 a difference beyond the limits; 2 bad settings, a missing model
or a backend that fails to load; 3 TensorRT is not available here, so there is nothing to
compare (ONNX Runtime alone was run and works).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from appliance.backends.base import BackendError, FloatArray, InferenceBackend
from appliance.commands.engines import (
    EXIT_CONFIG,
    EXIT_NO_TENSORRT,
    EXIT_OK,
    ModelTarget,
    TargetError,
    add_model_arguments,
    configured_models,
    settings_from_args,
)
from appliance.config import ConfigError, Settings

EXIT_MISMATCH = 1
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MAX_DET_DIFF = 0.05

OpenBackend = Callable[[ModelTarget], InferenceBackend]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How far the candidate backend's outputs are from the reference's on one batch."""

    model: str
    family: str
    batch: int
    # Largest |reference - candidate| per output name.
    max_abs_diff: dict[str, float]
    # Cosine between each image's reference and candidate embedding (recognisers only).
    cosines: tuple[float, ...] = ()

    @property
    def largest_diff(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    @property
    def min_cosine(self) -> float | None:
        return min(self.cosines) if self.cosines else None


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "check",
        help="compare TensorRT and ONNX Runtime outputs of the configured models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE)
    p.add_argument("--max-det-diff", type=float, default=DEFAULT_MAX_DET_DIFF)
    p.add_argument("--seed", type=int, default=0, help="seed of the test batch")
    p.set_defaults(handler=run)


def sample_batch(settings: Settings, target: ModelTarget, seed: int) -> FloatArray:
    """A full batch of seeded pixels, normalised the way the pipeline feeds this model."""
    from appliance.backends.factory import image_shape_for
    from appliance.models.loader import normalizes_input

    shape = (target.max_batch, *image_shape_for(settings, target.info))
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float32)
    pre = target.info.default_preprocess
    if normalizes_input(target.info, target.path):
        return pixels
    return ((pixels - pre.mean) / pre.std).astype(np.float32)


def _cosines(a: FloatArray, b: FloatArray) -> tuple[float, ...]:
    a2 = a.reshape(a.shape[0], -1).astype(np.float64)
    b2 = b.reshape(b.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    dots = np.sum(a2 * b2, axis=1)
    return tuple(float(d / n) if n > 0 else 0.0 for d, n in zip(dots, norms, strict=True))


def compare(
    target: ModelTarget,
    reference: InferenceBackend,
    candidate: InferenceBackend,
    batch: FloatArray,
) -> Comparison:
    ref = reference.infer(batch)
    got = candidate.infer(batch)
    ref_names = [s.name for s in reference.outputs]
    got_names = [s.name for s in candidate.outputs]
    if len(ref_names) != len(got_names):
        raise BackendError(
            f"{target.info.name}: {len(ref_names)} outputs from ONNX Runtime, "
            f"{len(got_names)} from TensorRT"
        )
    diffs: dict[str, float] = {}
    cosines: tuple[float, ...] = ()
    # Outputs are matched by declared order, which is what the pipeline relies on.
    for r_name, g_name in zip(ref_names, got_names, strict=True):
        r, g = ref[r_name], got[g_name]
        if r.shape != g.shape:
            raise BackendError(
                f"{target.info.name}: output {r_name} is {r.shape} from ONNX Runtime but "
                f"{g.shape} from TensorRT"
            )
        diffs[r_name] = float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0
        if target.info.family == "arcface":
            cosines = _cosines(r, g)
    return Comparison(target.info.name, target.info.family, batch.shape[0], diffs, cosines)


def verdict(c: Comparison, min_cosine: float, max_det_diff: float) -> bool:
    if c.family == "arcface":
        return c.min_cosine is not None and c.min_cosine >= min_cosine
    return c.largest_diff <= max_det_diff


def report(c: Comparison, ok: bool, out: TextIO) -> None:
    status = "ok" if ok else "MISMATCH"
    if c.family == "arcface":
        cos = np.array(c.cosines)
        print(
            f"{c.model} (recogniser, batch {c.batch}): cosine min {cos.min():.6f} "
            f"mean {cos.mean():.6f}; max |diff| {c.largest_diff:.3g}: {status}",
            file=out,
        )
        return
    print(
        f"{c.model} (detector, batch {c.batch}): max |diff| {c.largest_diff:.3g}: {status}",
        file=out,
    )
    for name, diff in c.max_abs_diff.items():
        print(f"    output {name}: max |diff| {diff:.3g}", file=out)


def check_models(
    settings: Settings,
    targets: list[ModelTarget],
    open_reference: OpenBackend,
    open_candidate: OpenBackend,
    min_cosine: float = DEFAULT_MIN_COSINE,
    max_det_diff: float = DEFAULT_MAX_DET_DIFF,
    seed: int = 0,
    out: TextIO = sys.stdout,
) -> int:
    """Compare candidate with reference on each target; returns the exit code."""
    faithful = True
    for target in targets:
        reference = open_reference(target)
        try:
            candidate = open_candidate(target)
            try:
                result = compare(target, reference, candidate, sample_batch(settings, target, seed))
            finally:
                candidate.close()
        finally:
            reference.close()
        ok = verdict(result, min_cosine, max_det_diff)
        faithful = faithful and ok
        report(result, ok, out)
    if faithful:
        print("TensorRT engines match ONNX Runtime within the limits", file=out)
        return EXIT_OK
    print(
        f"TensorRT differs from ONNX Runtime beyond the limits (cosine >= {min_cosine}, "
        f"detector |diff| <= {max_det_diff})",
        file=out,
    )
    return EXIT_MISMATCH


def smoke_test(settings: Settings, targets: list[ModelTarget], seed: int, out: TextIO) -> None:
    """Run ONNX Runtime alone, so an operator still learns that the models work."""
    from appliance.backends.factory import open_backend

    for target in targets:
        backend = open_backend("onnx", settings, target.info, target.path, target.max_batch)
        try:
            outputs = backend.infer(sample_batch(settings, target, seed))
        finally:
            backend.close()
        finite = all(bool(np.isfinite(v).all()) for v in outputs.values())
        print(
            f"{target.info.name}: ONNX Runtime ran a batch of {target.max_batch} "
            f"({backend.batch_plan.mode}, {backend.batch_plan.effective} per run): "
            f"{len(outputs)} output(s), {'all finite' if finite else 'NOT FINITE'}",
            file=out,
        )


def run(args: argparse.Namespace) -> int:
    from appliance.backends.factory import open_backend, tensorrt_usable

    try:
        settings = settings_from_args(args)
        targets = configured_models(settings, args.models)
    except (ConfigError, TargetError) as exc:
        print(f"appliance check: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from appliance.logs import configure_logging

    # Engine builds that `check` triggers report their progress through the log.
    configure_logging(settings.log_level, settings.log_format)
    usable, reason = tensorrt_usable()
    try:
        if not usable:
            smoke_test(settings, targets, args.seed, sys.stdout)
            print(
                f"appliance check: only ONNX Runtime is available here ({reason}); "
                f"there is no TensorRT engine to compare (exit code {EXIT_NO_TENSORRT})",
                file=sys.stderr,
            )
            return EXIT_NO_TENSORRT
        return check_models(
            settings,
            targets,
            lambda t: open_backend("onnx", settings, t.info, t.path, t.max_batch),
            lambda t: open_backend("trt", settings, t.info, t.path, t.max_batch),
            min_cosine=args.min_cosine,
            max_det_diff=args.max_det_diff,
            seed=args.seed,
        )
    except BackendError as exc:
        print(f"appliance check: {exc}", file=sys.stderr)
        return EXIT_CONFIG
