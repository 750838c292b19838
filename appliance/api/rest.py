"""The InsightFace-REST routes: /extract, /draw_detections and their multipart variants.

Each handler reads top to bottom: decode the body into its wire type (`request_body`),
analyse the images, encode the response type (`responses`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from functools import partial

import cv2
import msgspec
import numpy as np
from aiohttp import web

from appliance.api import state
from appliance.api.admission import decode_admitted_with, off_loop, run_all
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
from appliance.pipeline.faces import Face, ImageResult, Prepared
from appliance.pipeline.images import Decoded, ImageArray, ImageError, encode_jpeg

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


DecodeJob = Callable[[bytes, Reservation], Decoded | Prepared]


def detection_fit(app: web.Application, req: ParsedExtract) -> tuple[int, int] | None:
    """The letterbox a reduced-scale decode must still fill (JPEG_DCT_SCALING), or None for a
    full decode (scaling off)."""
    if not app[state.SETTINGS].jpeg_dct_scaling:
        return None
    full = app[state.ANALYZER].detector.input_size
    if req.max_size is None:
        return full
    return min(req.max_size[0], full[0]), min(req.max_size[1], full[1])


def decode_job(app: web.Application, req: ParsedExtract, drawn: bool) -> DecodeJob:
    """What the executor does with an admitted image's bytes, in one hand-off: decode it and,
    unless it is an embed_only crop, letterbox it for the detector right there (a hand-off
    less per image; on a loaded CPU each one is a wake-up and a GIL exchange). With
    JPEG_DCT_SCALING the decode is at a reduced scale, except for the image /draw_detections
    draws on (`drawn`), which is decoded in full."""
    decoder, analyzer = app[state.DECODER], app[state.ANALYZER]
    if req.request.embed_only:
        return lambda raw, held: Decoded(decoder.decode(raw, held), 1.0, 1.0)
    fit = None if drawn else detection_fit(app, req)
    if fit is None:
        return lambda raw, held: analyzer.prepare(decoder.decode(raw, held), req.max_size)
    reduced = fit
    return lambda raw, held: analyzer.prepare(decoder.decode_for(raw, reduced, held), req.max_size)


async def admit(
    app: web.Application, req: ParsedExtract, index: int, held: list[Reservation], job: DecodeJob
) -> tuple[Decoded | Prepared, Reservation] | ApiError | ImageError:
    """Image `index`: bytes -> admission (probe, reserve) -> `job` (decode, letterbox). Its
    reservation joins `held` the moment it exists, so the group releases it whatever happens
    next; a bad image is returned as its own failure, a full budget raises (503 for the
    request)."""
    raw = await image_bytes(app, req, index)
    if isinstance(raw, ApiError):
        return raw
    decoder, executor = app[state.DECODER], app[state.EXECUTOR]
    try:
        decoded, reservation = await decode_admitted_with(decoder, executor, raw, job)
    except ImageError as exc:
        return exc
    held.append(reservation)
    return decoded, reservation


def pixels(item: Decoded | Prepared) -> ImageArray:
    return item.image.pixels if isinstance(item, Prepared) else item.pixels


async def analyze_group(
    app: web.Application, req: ParsedExtract, indices: range, keep: list[Reservation] | None
) -> list[Outcome]:
    """A group of images admitted and decoded together (the first 503 cancels the rest), then
    analysed together: the detector's batcher groups their detections and the crops of all of
    them go to the recognizer in one submission.

    Their pixels are released when the group is done, except image 0's when `keep` is given
    (/draw_detections still draws it): its reservation goes to `keep` for the caller.
    """
    held: list[Reservation] = []
    kept: Reservation | None = None
    try:
        job = decode_job(app, req, drawn=keep is not None)
        jobs = [partial(admit, app, req, i, held, job) for i in indices]
        admitted = await run_all(jobs, len(jobs))
        images = [a[0] for a in admitted if isinstance(a, tuple)]
        analyzer = app[state.ANALYZER]
        if req.request.embed_only:
            results = iter(await analyzer.embed_many([pixels(image) for image in images]))
        else:
            results = iter(await analyzer.analyze_many(images, req.options()))
        outcomes: list[Outcome] = []
        for index, item in zip(indices, admitted, strict=True):
            if not isinstance(item, tuple):
                outcomes.append((None, item))
            elif index == 0 and keep is not None:
                kept = item[1]
                outcomes.append((pixels(item[0]), next(results)))
            else:
                outcomes.append((None, next(results)))
        return outcomes
    finally:
        for reservation in held:
            if reservation is kept and keep is not None:
                keep.append(reservation)
            else:
                reservation.release()


async def run_analysis(
    app: web.Application, req: ParsedExtract, held: list[Reservation] | None = None
) -> list[Outcome]:
    """Every image of the request, REQUEST_IMAGE_CONCURRENCY at a time; one 503 stops them all.

    Images go in groups of REQUEST_IMAGE_CONCURRENCY: a group holds at most that many decoded
    images (the bound each request had when its images were analysed one by one), and the
    next group starts once its pixels are released.
    """
    ensure_accepting(app)
    settings = app[state.SETTINGS]
    size = max(1, settings.request_image_concurrency)

    async def run() -> list[Outcome]:
        outcomes: list[Outcome] = []
        # Counted from before the first decode: this request's model runs are coming, so a
        # run of another request must not take every core meanwhile (`batcher.Demand`).
        with app[state.ANALYZER].demand.analysis():
            for start in range(0, req.count, size):
                group = range(start, min(start + size, req.count))
                outcomes += await analyze_group(app, req, group, held)
        return outcomes

    try:
        return await asyncio.wait_for(run(), settings.request_timeout_s)
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


def first_image_detections(req: ParsedExtract) -> ParsedExtract:
    """/draw_detections draws the first image's boxes and landmarks only: that image alone is
    analysed, without embeddings or face data (as InsightFace-REST's draw asks its model), so
    the recognizer does no work for a picture that shows none of it."""
    request = msgspec.structs.replace(
        req.request, extract_embedding=False, return_face_data=False, embed_only=False
    )
    data, urls = (req.data[:1], []) if req.data else ([], req.urls[:1])
    return dataclasses.replace(req, request=request, data=data, urls=urls)


async def draw_response(request: web.Request, req: ParsedExtract) -> web.Response:
    held: list[Reservation] = []
    try:
        results = await run_analysis(request.app, first_image_detections(req), held)
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
