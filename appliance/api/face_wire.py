"""Pipeline results into wire types: faces, per-image entries and the warnings they carry.

Numbers leave numpy once per array (`tolist()` on the rounded array), never one Python
`round()` per element.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from appliance.api.errors import ApiError
from appliance.api.metrics import Metrics
from appliance.api.wire import ExtractOptions, FaceOut, ImageFailed, ImageOk
from appliance.pipeline.faces import Face, ImageResult
from appliance.pipeline.images import ImageError, encode_jpeg

DEMO_WARNING = (
    "demo models: the generated demo detector/recognizer answer; boxes and embeddings carry no "
    "meaning (see README, Models)"
)


def coordinates(values: Any, subpixel: bool) -> Any:
    """InsightFace-REST's `astype(int)` (truncation toward zero) unless sub-pixel was asked."""
    array = np.asarray(values, dtype=np.float64)
    if subpixel:
        return np.round(array, 2).tolist()
    return array.astype(np.int64).tolist()


def face_out(face: Face, index: int, opts: ExtractOptions) -> FaceOut:
    x1, _, x2, _ = face.bbox
    width = x2 - x1
    out = FaceOut(
        num_det=index,
        prob=round(float(face.prob), 6),
        bbox=coordinates(face.bbox, opts.subpixel),
        size=round(float(width), 2) if opts.subpixel else int(width),
        landmarks=(
            coordinates(face.landmarks, opts.subpixel)
            if opts.return_landmarks and face.landmarks is not None
            else None
        ),
        norm=round(float(face.norm), 4) if face.norm is not None else None,
        vec=(np.round(face.vec.astype(np.float64), 6).tolist() if face.vec is not None else None),
        facedata=(
            base64.b64encode(encode_jpeg(face.crop)).decode("ascii")
            if opts.return_face_data and face.crop is not None
            else None
        ),
    )
    if opts.extract_ga:
        # No gender/age model ships with the appliance: say so instead of inventing values.
        out.gender = None
        out.age = None
    if opts.detect_masks:
        out.mask_prob = None
    return out


def image_entry(
    result: ImageResult | ApiError | ImageError, opts: ExtractOptions, metrics: Metrics
) -> ImageOk | ImageFailed:
    if isinstance(result, (ApiError, ImageError)):
        metrics.images.labels("error").inc()
        message = result.message if isinstance(result, ApiError) else str(result)
        return ImageFailed(error=message, code=result.code)
    metrics.images.labels("ok").inc()
    metrics.faces.inc(len(result.faces))
    entry = ImageOk(
        took_ms=round(sum(result.timings_ms.values()), 3),
        faces=[face_out(face, i, opts) for i, face in enumerate(result.faces)],
    )
    if opts.verbose_timings:
        entry.took = {k: round(v, 3) for k, v in result.timings_ms.items()}
    return entry


def unavailable_warnings(opts: ExtractOptions) -> list[str]:
    warnings = []
    if opts.extract_ga:
        warnings.append(
            "extract_ga: no gender/age model is configured; 'gender' and 'age' are null"
        )
    if opts.detect_masks:
        warnings.append("detect_masks: no mask model is configured; 'mask_prob' is null")
    return warnings
