"""Default open-set thresholds (cosine similarity) per recognizer, keyed by registry name.

A face is named only when its best similarity reaches the threshold. These are starting
points; `appliance gallery calibrate DIR` measures the right value on the operator's photos,
and `IDENTIFY_THRESHOLD` overrides the table.

- glintr100, w600k_r50, arcface_r100_v1 (ResNet-100/50 ArcFace): impostor similarities of
  these models sit below ~0.2 and genuine pairs of frontal faces above ~0.5 on IJB-C style
  data; 0.4 keeps the false-accept rate near 1e-4 while losing few genuine matches.
- w600k_mbf (MobileFaceNet, 512-d) spreads genuine pairs lower: 0.35.
- mobilefacenet_128 (the 128-d MobileFaceNet of ../shared/models): on the shared photos
  genuine pairs score 0.73-0.97 and strangers at most 0.23 (DATA.md); 0.4 sits in the gap.
"""

from __future__ import annotations

FALLBACK_THRESHOLD = 0.4

DEFAULT_THRESHOLDS: dict[str, float] = {
    "glintr100": 0.4,
    "w600k_r50": 0.4,
    "arcface_r100_v1": 0.4,
    "w600k_mbf": 0.35,
    "mobilefacenet_128": 0.4,
}


def default_threshold(recognizer: str) -> float:
    """The table's value for this recognizer, FALLBACK_THRESHOLD for one it does not know."""
    return DEFAULT_THRESHOLDS.get(recognizer, FALLBACK_THRESHOLD)


def effective_threshold(configured: float | None, recognizer: str) -> float:
    """IDENTIFY_THRESHOLD when set, else the recognizer's default."""
    return default_threshold(recognizer) if configured is None else configured
