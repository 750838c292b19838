"""Pipeline results into wire types, and wire types onto the socket (JSON or msgpack).

Numbers leave numpy once per array (`tolist()` on the rounded array), never one Python
`round()` per element; a response with many faces is encoded in the executor so the event
loop keeps serving while 512 floats per face become text.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from aiohttp import web

from appliance.api import state
from appliance.api.errors import ApiError
from appliance.api.metrics import Metrics
from appliance.api.wire import (
    ErrorDetail,
    ErrorResponse,
    ExtractOptions,
    FaceOut,
    ImageFailed,
    ImageOk,
    encode_json,
    encode_msgpack,
)
from appliance.pipeline.faces import Face, ImageResult
from appliance.pipeline.images import ImageError, encode_jpeg

# Above this many faces the encoding (about 10 us a face as JSON) leaves the event loop; below
# it the hop to a thread costs more than it saves.
OFFLOAD_FACES = 16
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


def wants_msgpack(request: web.Request, asked: bool) -> bool:
    return asked or "application/msgpack" in request.headers.get("Accept", "")


async def respond(
    request: web.Request, payload: Any, use_msgpack: bool, faces: int = 0, status: int = 200
) -> web.Response:
    """Encode a wire type as JSON or msgpack; large payloads off the event loop."""
    as_msgpack = wants_msgpack(request, use_msgpack)
    encode = encode_msgpack if as_msgpack else encode_json
    if faces > OFFLOAD_FACES:
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(request.app[state.EXECUTOR], encode, payload)
    else:
        body = encode(payload)
    return web.Response(
        body=body,
        status=status,
        content_type="application/msgpack" if as_msgpack else "application/json",
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = ErrorResponse(ErrorDetail(code=code, message=message))
    return web.Response(
        body=encode_json(body), status=status, headers=headers, content_type="application/json"
    )
