"""The InsightFace-REST routes: /extract, /draw_detections and their multipart variants.

Each handler reads top to bottom: decode the body into its wire type (`request_body`),
analyse the images, encode the response type (`responses`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import cv2
import numpy as np
from aiohttp import web

from appliance.api import state
from appliance.api.admission import decode_admitted, off_loop, run_all
from appliance.api.errors import (
    ApiError,
    GatewayTimeout,
    ServiceUnavailable,
    Unprocessable,
)
from appliance.api.face_wire import DEMO_WARNING, image_entry, unavailable_warnings
from appliance.api.identify import (
    SearchParams,
    apply_identities,
    identify_results,
    with_embeddings,
)
from appliance.api.request_body import ParsedExtract, decode_base64, read_extract, read_multipart
from appliance.api.responses import respond
from appliance.api.urls import fetch_image
from appliance.api.wire import ExtractResponse, Took
from appliance.pipeline.batcher import BatcherClosedError, QueueFullError
from appliance.pipeline.budget import Reservation
from appliance.pipeline.faces import Face, ImageResult
from appliance.pipeline.images import ImageArray, ImageError, encode_jpeg

routes = web.RouteTableDef()

Outcome = tuple[ImageArray | None, ImageResult | ApiError | ImageError]


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


async def image_bytes(app: web.Application, req: ParsedExtract, index: int) -> bytes | ApiError:
    """The raw bytes of image `index` (base64 items first, then URLs); a failure is its own."""
    settings = app[state.SETTINGS]
    try:
        if index < len(req.data):
            item = req.data[index]
            return await off_loop(app[state.EXECUTOR], len(item), lambda: decode_base64(item))
        if not settings.allow_url_inputs:
            return ApiError(
                "URL inputs are disabled (ALLOW_URL_INPUTS=0)", code="urls_disabled", status=403
            )
        return await fetch_image(
            app[state.URL_SESSION],
            req.urls[index - len(req.data)],
            settings.max_body_bytes,
            settings.url_allowlist,
            req.request.img_req_headers,
        )
    except ApiError as exc:
        return exc


async def analyze_one(
    app: web.Application, req: ParsedExtract, index: int, held: list[Reservation] | None
) -> Outcome:
    """One image: bytes -> admission (probe, reserve) -> decode -> detect/embed.

    Its pixels are released as soon as its analysis is done, unless `held` is given (the
    caller still needs the image: /draw_detections); then the caller releases them.
    """
    raw = await image_bytes(app, req, index)
    if isinstance(raw, ApiError):
        return None, raw
    try:
        img, reservation = await decode_admitted(app[state.DECODER], app[state.EXECUTOR], raw)
    except ImageError as exc:
        return None, exc
    del raw
    try:
        analyzer = app[state.ANALYZER]
        if req.request.embed_only:
            result = await analyzer.embed_only(img)
        else:
            result = await analyzer.analyze(img, req.options())
    except BaseException:
        reservation.release()
        raise
    if held is None:
        reservation.release()
        return None, result
    held.append(reservation)
    return img, result


async def run_analysis(
    app: web.Application, req: ParsedExtract, held: list[Reservation] | None = None
) -> list[Outcome]:
    """Every image of the request, REQUEST_IMAGE_CONCURRENCY at a time; one 503 stops them all."""
    ensure_accepting(app)
    settings = app[state.SETTINGS]

    def job(index: int) -> Callable[[], Awaitable[Outcome]]:
        # Only /draw_detections' first image is kept decoded past its analysis.
        return lambda: analyze_one(app, req, index, held if index == 0 else None)

    try:
        return await asyncio.wait_for(
            run_all([job(i) for i in range(req.count)], settings.request_image_concurrency),
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


async def extract_response(
    request: web.Request, req: ParsedExtract, search: SearchParams | None = None
) -> web.Response:
    start = time.perf_counter()
    if search is None and req.request.identify:
        search = SearchParams()
    shown = req.request  # what the client asked to see
    if search is not None:  # a search needs embeddings even where `vec` is not wanted
        req = with_embeddings(req)
    results = await run_analysis(request.app, req)
    identities = None
    if search is not None:  # /gallery/search, or /extract with "identify": true
        outcomes = [result for _, result in results]
        identities = await identify_results(request.app[state.GALLERY], outcomes, search)
    metrics = request.app[state.METRICS]
    warnings = [*req.warnings, *unavailable_warnings(req.request)]
    demo = request.app[state.MODELS].demo
    if demo:
        warnings.append(DEMO_WARNING)
    total_ms = round((time.perf_counter() - start) * 1e3, 3)

    def build() -> ExtractResponse:
        entries = [image_entry(result, shown, metrics) for _, result in results]
        if identities is not None:
            apply_identities(entries, identities, shown.extract_embedding)
        payload = ExtractResponse(took=Took(total_ms=total_ms), data=entries)
        if demo:
            payload.demo = True
        if warnings:
            payload.warnings = warnings
        return payload

    faces = sum(len(r.faces) for _, r in results if isinstance(r, ImageResult))
    return await respond(request, build, req.request.msgpack, faces=faces)


async def draw_response(request: web.Request, req: ParsedExtract) -> web.Response:
    held: list[Reservation] = []
    try:
        results = await run_analysis(request.app, req, held)
        img, result = results[0]
        if isinstance(result, (ApiError, ImageError)) or img is None:
            message = result.message if isinstance(result, ApiError) else str(result)
            raise Unprocessable(f"the first image cannot be used: {message}")
        jpeg = await asyncio.get_running_loop().run_in_executor(
            request.app[state.EXECUTOR], lambda: encode_jpeg(draw(img, result.faces))
        )
    finally:
        for reservation in held:
            reservation.release()
    return web.Response(body=jpeg, content_type="image/jpeg")


@routes.post("/extract")
async def extract(request: web.Request) -> web.Response:
    req = await read_extract(request, request.app[state.SETTINGS])
    return await extract_response(request, req)


@routes.post("/draw_detections")
async def draw_detections(request: web.Request) -> web.Response:
    req = await read_extract(request, request.app[state.SETTINGS])
    return await draw_response(request, req)


@routes.post("/multipart/extract")
async def multipart_extract(request: web.Request) -> web.Response:
    req = await read_multipart(request, request.app[state.SETTINGS])
    return await extract_response(request, req)


@routes.post("/multipart/draw_detections")
async def multipart_draw_detections(request: web.Request) -> web.Response:
    req = await read_multipart(request, request.app[state.SETTINGS])
    return await draw_response(request, req)
