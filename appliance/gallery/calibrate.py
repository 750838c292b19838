"""Open-set calibration: genuine and impostor similarity distributions of labelled faces and
the threshold that keeps the false-accept rate at or below a target.

Pure numpy; `appliance gallery calibrate` feeds it embeddings from the real pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from appliance.gallery.records import FloatArray


@dataclasses.dataclass(frozen=True)
class Calibration:
    genuine: FloatArray  # similarity of every pair of faces of the same subject
    impostor: FloatArray  # similarity of every pair of faces of different subjects
    far: float  # the false-accept rate asked for
    threshold: float  # smallest threshold whose impostor accept rate is <= far
    achieved_far: float  # impostor pairs at or above the threshold / all impostor pairs
    frr: float  # genuine pairs below the threshold / all genuine pairs (nan without pairs)


def pair_similarities(labels: Sequence[str], vecs: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(genuine, impostor) cosine similarities over all unordered pairs of unit vectors."""
    sims = vecs @ vecs.T
    lab = np.asarray(labels)
    upper = np.triu(np.ones(sims.shape, bool), k=1)
    same = lab[:, None] == lab[None, :]
    return (
        np.asarray(sims[upper & same], np.float32),
        np.asarray(sims[upper & ~same], np.float32),
    )


def threshold_at_far(impostor: FloatArray, far: float) -> float:
    """The smallest threshold t with mean(impostor >= t) <= far (identity needs sim >= t).

    With n impostor pairs at most floor(far * n) may pass; t is set just above the next one.
    Few pairs make this coarse: 1,000 pairs cannot resolve a rate below 1e-3.
    """
    if impostor.size == 0:
        raise ValueError("no impostor pairs: calibration needs at least two subjects")
    ordered = np.sort(impostor.astype(np.float64))[::-1]
    allowed = int(np.floor(far * ordered.size))
    if allowed >= ordered.size:
        return float(ordered[-1])
    return float(np.nextafter(ordered[allowed], np.inf))


def calibrate(labels: Sequence[str], vecs: FloatArray, far: float) -> Calibration:
    genuine, impostor = pair_similarities(labels, vecs)
    thr = threshold_at_far(impostor, far)
    # Compare in float64: thr sits one float64 step above a float32 similarity and would round
    # back onto it in a float32 comparison.
    achieved = float(np.mean(impostor.astype(np.float64) >= thr))
    frr = float(np.mean(genuine.astype(np.float64) < thr)) if genuine.size else float("nan")
    return Calibration(genuine, impostor, far, thr, achieved, frr)


def histogram(values: FloatArray, lo: float = -0.2, hi: float = 1.0, bins: int = 12) -> list[str]:
    """Text histogram lines "[ 0.30, 0.40)  ####  12" of similarities."""
    counts, edges = np.histogram(np.clip(values, lo, hi - 1e-9), bins=bins, range=(lo, hi))
    peak = max(int(counts.max()), 1) if counts.size else 1
    return [
        f"[{edges[i]:5.2f}, {edges[i + 1]:5.2f})  {'#' * round(30 * c / peak):<30}  {c}"
        for i, c in enumerate(counts.tolist())
    ]


def summary(values: FloatArray) -> str:
    if values.size == 0:
        return "no pairs"
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return (
        f"{values.size} pairs: min {q[0]:.3f}  p5 {q[1]:.3f}  median {q[2]:.3f}  "
        f"p95 {q[3]:.3f}  max {q[4]:.3f}"
    )
