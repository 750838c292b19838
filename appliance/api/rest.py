"""REST routes: /extract, /draw_detections, their multipart variants, /info, health, metrics."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import cv2
import msgpack
import numpy as np
from aiohttp import BodyPartReader, web

from appliance import __version__
from appliance.api import state
from appliance.api.errors import (
    ApiError,
    BadRequest,
    GatewayTimeout,
    ServiceUnavailable,
    Unprocessable,
    UnsupportedMediaType,
)
from appliance.api.schemas import (
    ExtractRequest,
    decode_base64,
    face_to_dict,
    parse_extract,
    parse_options,
    unavailable_warnings,
)
from appliance.api.urls import fetch_image
from appliance.pipeline.batcher import BatcherClosedError, QueueFullError
from appliance.pipeline.faces import Face, ImageResult
from appliance.pipeline.images import ImageArray, ImageError, encode_jpeg

routes = web.RouteTableDef()
JSON_TYPES = {"application/json", "text/json", ""}
MSGPACK_TYPES = {"application/msgpack", "application/x-msgpack"}


# ---------------------------------------------------------------- helpers


async def read_body(request: web.Request) -> Any:
    ctype = request.content_type
    if ctype not in JSON_TYPES and ctype not in MSGPACK_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r} is not accepted; send application/json or application/msgpack"
        )
    raw = await request.read()
    if not raw:
        raise BadRequest("request body is empty", code="invalid_body")
    if ctype in MSGPACK_TYPES:
        try:
            return msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise BadRequest(f"body is not valid msgpack: {exc}", code="invalid_msgpack") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from None


def respond(
    request: web.Request, payload: dict[str, Any], use_msgpack: bool, status: int = 200
) -> web.Response:
    if use_msgpack or "application/msgpack" in request.headers.get("Accept", ""):
        return web.Response(
            body=msgpack.packb(payload, use_bin_type=True),
            status=status,
            content_type="application/msgpack",
        )
    return web.json_response(payload, status=status)


def ensure_accepting(app: web.Application) -> None:
    """Refuse inference while the governor has paused it (critical temperature or memory)."""
    policy = app[state.POLICY].current
    if policy.inference_paused:
        settings = app[state.SETTINGS]
        raise ServiceUnavailable(
            f"inference is paused: the device is {policy.state} ({policy.reason})",
            code="inference_paused",
            headers={"Retry-After": str(max(settings.retry_after_s, 1))},
        )


async def load_images(app: web.Application, req: ExtractRequest) -> list[bytes | ApiError]:
    """Raw bytes per image in request order; a failure is that image's own error."""
    settings = app[state.SETTINGS]

    async def from_url(url: str) -> bytes | ApiError:
        if not settings.allow_url_inputs:
            return ApiError(
                "URL inputs are disabled (ALLOW_URL_INPUTS=0)", code="urls_disabled", status=403
            )
        try:
            return await fetch_image(
                app[state.URL_SESSION],
                url,
                settings.max_body_bytes,
                settings.url_allowlist,
                req.img_req_headers,
            )
        except ApiError as exc:
            return exc

    def from_b64(item: str | bytes) -> bytes | ApiError:
        try:
            return decode_base64(item)
        except ApiError as exc:
            return exc

    out: list[bytes | ApiError] = [from_b64(item) for item in req.data]
    out += await asyncio.gather(*(from_url(u) for u in req.urls))
    return out


async def decode(app: web.Application, raw: bytes) -> ImageArray:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(app[state.EXECUTOR], app[state.DECODER].decode, raw)


async def analyze_one(
    app: web.Application, raw: bytes | ApiError, req: ExtractRequest
) -> tuple[ImageArray | None, ImageResult | ApiError | ImageError]:
    if isinstance(raw, ApiError):
        return None, raw
    try:
        img = await decode(app, raw)
    except ImageError as exc:
        return None, exc
    analyzer = app[state.ANALYZER]
    if req.embed_only:
        return img, await analyzer.embed_only(img)
    return img, await analyzer.analyze(img, req.options())


async def run_analysis(
    app: web.Application, req: ExtractRequest
) -> list[tuple[ImageArray | None, ImageResult | ApiError | ImageError]]:
    ensure_accepting(app)
    settings = app[state.SETTINGS]
    raws = await load_images(app, req)
    try:
        return await asyncio.wait_for(
            asyncio.gather(*(analyze_one(app, raw, req) for raw in raws)),
            settings.request_timeout_s,
        )
    except QueueFullError as exc:
        app[state.METRICS].queue_rejections.labels(str(exc).split()[0]).inc()
        raise ServiceUnavailable(
            f"the appliance is at capacity ({exc}); retry shortly",
            code="overloaded",
            headers={"Retry-After": str(max(settings.retry_after_s, 1))},
        ) from None
    except BatcherClosedError:
        raise ServiceUnavailable("the appliance is shutting down", code="shutting_down") from None
    except asyncio.TimeoutError:
        raise GatewayTimeout(
            f"processing took longer than REQUEST_TIMEOUT_S ({settings.request_timeout_s} s)"
        ) from None


def image_entry(
    result: ImageResult | ApiError | ImageError, req: ExtractRequest, metrics: Any
) -> dict[str, Any]:
    if isinstance(result, (ApiError, ImageError)):
        metrics.images.labels("error").inc()
        code = result.code
        message = result.message if isinstance(result, ApiError) else str(result)
        return {"status": "error", "error": message, "code": code}
    metrics.images.labels("ok").inc()
    metrics.faces.inc(len(result.faces))
    entry: dict[str, Any] = {
        "status": "ok",
        "took_ms": round(sum(result.timings_ms.values()), 3),
        "faces": [face_to_dict(face, i, req) for i, face in enumerate(result.faces)],
    }
    if req.verbose_timings:
        entry["took"] = {k: round(v, 3) for k, v in result.timings_ms.items()}
    return entry


def draw(img: ImageArray, faces: list[Face]) -> ImageArray:
    canvas = np.ascontiguousarray(img.copy())
    thickness = max(1, round(max(img.shape[:2]) / 400))
    for face in faces:
        x1, y1, x2, y2 = (round(v) for v in face.bbox)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        cv2.putText(
            canvas,
            f"{face.prob:.2f}",
            (x1, max(y1 - 4, 12)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4 * thickness,
            (0, 255, 0),
            thickness,
        )
        if face.landmarks is not None:
            for x, y in face.landmarks:
                cv2.circle(canvas, (round(x), round(y)), thickness + 1, (0, 0, 255), -1)
    return canvas


async def extract_response(request: web.Request, req: ExtractRequest) -> web.Response:
    start = time.perf_counter()
    results = await run_analysis(request.app, req)
    metrics = request.app[state.METRICS]
    payload: dict[str, Any] = {
        "took": {"total_ms": 0.0},
        "data": [image_entry(result, req, metrics) for _, result in results],
    }
    warnings = [*req.warnings, *unavailable_warnings(req)]
    if warnings:
        payload["warnings"] = warnings
    payload["took"]["total_ms"] = round((time.perf_counter() - start) * 1e3, 3)
    return respond(request, payload, req.msgpack)


async def draw_response(request: web.Request, req: ExtractRequest) -> web.Response:
    results = await run_analysis(request.app, req)
    img, result = results[0]
    if isinstance(result, (ApiError, ImageError)) or img is None:
        message = result.message if isinstance(result, ApiError) else str(result)
        raise Unprocessable(f"the first image cannot be used: {message}")
    jpeg = await asyncio.get_running_loop().run_in_executor(
        request.app[state.EXECUTOR], lambda: encode_jpeg(draw(img, result.faces))
    )
    return web.Response(body=jpeg, content_type="image/jpeg")


def _request_from_body(request: web.Request, body: Any) -> ExtractRequest:
    settings = request.app[state.SETTINGS]
    return parse_extract(
        body, settings.det_threshold, settings.max_size, settings.max_images_per_request
    )


async def _request_from_multipart(request: web.Request) -> ExtractRequest:
    if not request.content_type.startswith("multipart/"):
        raise UnsupportedMediaType(
            f"Content-Type {request.content_type!r} is not accepted; send multipart/form-data"
        )
    settings = request.app[state.SETTINGS]
    files: list[bytes] = []
    fields: dict[str, Any] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not accepted", code="invalid_body")
        name = part.name or ""
        filename = part.filename
        data = await part.read()
        if filename is not None or name in ("images", "file", "files", "image"):
            files.append(bytes(data))
            if len(files) > settings.max_images_per_request:
                raise BadRequest(
                    f"more than {settings.max_images_per_request} files (MAX_IMAGES_PER_REQUEST)",
                    code="too_many_images",
                )
        else:
            fields[name] = bytes(data).decode("utf-8", errors="replace")
    if not files:
        raise BadRequest("no image files in the multipart body (field 'images')", code="no_images")
    unknown = sorted(set(fields) - set(parse_options({}, 0.5, settings.max_size)) - {"api_ver"})
    options = parse_options(fields, settings.det_threshold, settings.max_size)
    return ExtractRequest(
        data=list(files),
        urls=[],
        warnings=tuple(f"unknown field '{n}' ignored" for n in unknown),
        **options,
    )


# ---------------------------------------------------------------- routes


@routes.post("/extract")
async def extract(request: web.Request) -> web.Response:
    return await extract_response(request, _request_from_body(request, await read_body(request)))


@routes.post("/draw_detections")
async def draw_detections(request: web.Request) -> web.Response:
    return await draw_response(request, _request_from_body(request, await read_body(request)))


@routes.post("/multipart/extract")
async def multipart_extract(request: web.Request) -> web.Response:
    return await extract_response(request, await _request_from_multipart(request))


@routes.post("/multipart/draw_detections")
async def multipart_draw_detections(request: web.Request) -> web.Response:
    return await draw_response(request, await _request_from_multipart(request))


@routes.get("/info")
async def info(request: web.Request) -> web.Response:
    app = request.app
    models = app[state.MODELS]
    payload: dict[str, Any] = {
        "version": __version__,
        "backend": models.backend,
        "backend_reason": models.backend_reason,
        "models": {"detector": models.detector, "recognizer": models.recognizer},
        "jpeg_decoder": app[state.DECODER].jpeg_library,
        "settings": app[state.SETTINGS].public_dict(),
    }
    for name, provider in app[state.INFO_PROVIDERS].items():
        payload[name] = provider()
    return web.json_response(payload)


@routes.get("/health/live")
async def health_live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/health/ready")
async def health_ready(request: web.Request) -> web.Response:
    app = request.app
    models = app[state.MODELS]
    checks: dict[str, Any] = {"models": {"ok": models.loaded, "backend": models.backend}}
    for name, check in app[state.READINESS_CHECKS].items():
        checks[name] = check()
    ready = all(bool(c.get("ok")) for c in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status=200 if ready else 503,
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[state.METRICS].render(), content_type="text/plain", charset="utf-8"
    )
