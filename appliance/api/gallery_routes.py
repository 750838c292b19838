"""The `/gallery/*` routes (docs/GALLERY.md): subjects, faces, bulk enrolment, search,
verification, snapshots. Each handler decodes its wire type, calls the gallery in the
executor (`GalleryService`), and encodes the answer as JSON or msgpack."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import structlog
from aiohttp import web

from appliance.api import state
from appliance.api.errors import ApiError, BadRequest, Unprocessable
from appliance.api.gallery_body import (
    decode,
    error_of,
    is_msgpack,
    largest_faces,
    parse_images,
    read_typed,
    top_keys,
)
from appliance.api.gallery_service import GalleryMetrics, GalleryService
from appliance.api.gallery_wire import (
    BulkRequest,
    BulkResponse,
    BulkResult,
    CreateSubject,
    EnrolEmbeddings,
    EnrolFailed,
    EnrolOk,
    EnrolResponse,
    FaceDeleted,
    FaceInfo,
    ImportResponse,
    SearchRequest,
    SubjectDeleted,
    SubjectDetail,
    SubjectList,
    SubjectOut,
    UpdateSubject,
    VerifyRequest,
    VerifyResponse,
)
from appliance.api.identify import SearchParams
from appliance.api.request_body import read_multipart, resolve
from appliance.api.responses import respond
from appliance.api.rest import extract_response
from appliance.api.wire import ExtractOptions, ExtractRequest
from appliance.gallery import BulkSubject, Gallery, GalleryError, NewFace, Recognizer, Subject
from appliance.gallery import snapshot as snapshots

log = structlog.get_logger("appliance.gallery")
routes = web.RouteTableDef()

MAX_PAGE = 1000


def service(request: web.Request) -> GalleryService:
    return request.app[state.GALLERY]


def subject_out(s: Subject) -> SubjectOut:
    return SubjectOut(s.name, s.metadata, s.external_id, s.created, s.face_count)


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"'{name}' must be an integer within {low}..{high}", code="invalid_field")
    return int(raw)


async def reply(request: web.Request, payload: Any, status: int = 200) -> web.Response:
    return await respond(request, payload, False, status=status)


# ---------------------------------------------------------------- subjects


@routes.post("/gallery/subjects")
async def create_subject(request: web.Request) -> web.Response:
    body = await read_typed(request, CreateSubject)
    created = await service(request).write(
        lambda g: g.create_subject(body.subject, body.metadata, body.external_id)
    )
    log.info("gallery_subject_created")
    return await reply(request, subject_out(created), 201)


@routes.get("/gallery/subjects")
async def list_subjects(request: web.Request) -> web.Response:
    offset = int_query(request, "offset", 0, 0, 2**62)
    limit = int_query(request, "limit", 100, 1, MAX_PAGE)

    def page(g: Gallery) -> tuple[list[Subject], tuple[int, int]]:
        return g.list_subjects(offset, limit), g.counts()

    subjects, (total_subjects, total_faces) = await service(request).read(page)
    return await reply(
        request,
        SubjectList([subject_out(s) for s in subjects], offset, limit, total_subjects, total_faces),
    )


@routes.get("/gallery/subjects/{subject}")
async def get_subject(request: web.Request) -> web.Response:
    name = request.match_info["subject"]

    def detail(g: Gallery) -> SubjectDetail:
        s = g.get_subject(name)
        faces = [
            FaceInfo(f.face_id, f.created, f.recognizer, f.has_crop) for f in g.subject_faces(name)
        ]
        return SubjectDetail(s.name, s.metadata, s.external_id, s.created, s.face_count, faces)

    return await reply(request, await service(request).read(detail))


@routes.patch("/gallery/subjects/{subject}")
async def update_subject(request: web.Request) -> web.Response:
    name = request.match_info["subject"]
    body = await read_typed(request, UpdateSubject)
    metadata = body.metadata if isinstance(body.metadata, dict) else None
    set_external = body.external_id is not msgspec.UNSET
    external = body.external_id if isinstance(body.external_id, str) else None
    updated = await service(request).write(
        lambda g: g.update_subject(name, metadata, external, set_external_id=set_external)
    )
    return await reply(request, subject_out(updated))


@routes.delete("/gallery/subjects/{subject}")
async def delete_subject(request: web.Request) -> web.Response:
    name = request.match_info["subject"]
    count = await service(request).write(lambda g: g.delete_subject(name))
    return await reply(request, SubjectDeleted(name, count))


# ---------------------------------------------------------------- faces


async def enrol_images(request: web.Request) -> tuple[list[NewFace | None], list[Any]]:
    """The faces of an image body (JSON, msgpack or multipart) and one entry per image."""
    if request.content_type.startswith("multipart/"):
        parsed = await read_multipart(request, request.app[state.SETTINGS])
    else:
        packed = is_msgpack(request)
        raw = await request.read()
        if "embeddings" in top_keys(raw, packed):
            body, _ = decode(raw, packed, EnrolEmbeddings)
            return [NewFace(_vector(v)) for v in body.embeddings], []
        value, keys = decode(raw, packed, ExtractRequest)
        parsed = parse_images(value, keys, request)
    faces: list[NewFace | None] = []
    entries: list[Any] = []
    for item in await largest_faces(request.app, parsed):
        if isinstance(item, NewFace):
            faces.append(item)
            entries.append(None)
        else:
            faces.append(None)
            code, message = error_of(item)
            entries.append(EnrolFailed(message, code))
    return faces, entries


def _vector(values: list[float]) -> Any:
    import numpy as np

    return np.asarray(values, np.float32)


@routes.post("/gallery/subjects/{subject}/faces")
async def add_faces(request: web.Request) -> web.Response:
    name = request.match_info["subject"]
    svc = service(request)
    await svc.read(lambda g: g.get_subject(name))  # 404 before any analysis
    faces, entries = await enrol_images(request)
    found = [f for f in faces if f is not None]
    ids = await svc.write(lambda g: g.add_faces(name, found)) if found else []
    it = iter(ids)
    data = [EnrolOk(next(it)) if f is not None else entries[i] for i, f in enumerate(faces)]
    log.info("gallery_faces_enrolled", faces=len(ids), failed=len(faces) - len(ids))
    return await reply(request, EnrolResponse(name, ids, data), 201 if ids else 200)


@routes.delete("/gallery/faces/{face_id}")
async def delete_face(request: web.Request) -> web.Response:
    raw = request.match_info["face_id"]
    if not raw.isdigit():
        raise ApiError(f"no face {raw!r}", code="face_not_found", status=404)
    face_id = int(raw)
    await service(request).write(lambda g: g.delete_face(face_id))
    return await reply(request, FaceDeleted(face_id))


@routes.post("/gallery/bulk")
async def bulk_enrol(request: web.Request) -> web.Response:
    """Many subjects in one call and one transaction; images run in chunks of
    MAX_IMAGES_PER_REQUEST through the shared batchers."""
    body = await read_typed(request, BulkRequest)
    settings = request.app[state.SETTINGS]
    owners = [(i, img.value) for i, e in enumerate(body.subjects) for img in e.images]
    per_subject: list[list[NewFace]] = [
        [NewFace(_vector(v)) for v in e.embeddings] for e in body.subjects
    ]
    errors: list[list[EnrolFailed]] = [[] for _ in body.subjects]
    chunk = settings.max_images_per_request
    options = ExtractOptions(threshold=body.threshold)
    for start in range(0, len(owners), chunk):
        part = owners[start : start + chunk]
        parsed = resolve(options, [data for _, data in part], [], [], settings)
        for (owner, _), item in zip(part, await largest_faces(request.app, parsed), strict=True):
            if isinstance(item, NewFace):
                per_subject[owner].append(item)
            else:
                code, message = error_of(item)
                errors[owner].append(EnrolFailed(message, code))
    entries = [
        BulkSubject(e.subject, tuple(faces), e.metadata, e.external_id)
        for e, faces in zip(body.subjects, per_subject, strict=True)
    ]
    ids = await service(request).write(lambda g: g.enrol_bulk(entries))
    results = [
        BulkResult(e.subject, e.external_id, face_ids, errs)
        for e, face_ids, errs in zip(body.subjects, ids, errors, strict=True)
    ]
    log.info("gallery_bulk_enrolled", subjects=len(entries), faces=sum(map(len, ids)))
    return await reply(request, BulkResponse(results), 201)


# ---------------------------------------------------------------- search and verify


@routes.post("/gallery/search")
async def search(request: web.Request) -> web.Response:
    service(request).require()
    value, keys = decode(await request.read(), is_msgpack(request), SearchRequest)
    parsed = parse_images(value, keys, request)
    params = SearchParams(value.top_k, value.identify_threshold)
    return await extract_response(request, parsed, params)


@routes.post("/gallery/verify")
async def verify(request: web.Request) -> web.Response:
    svc = service(request)
    svc.require()
    value, keys = decode(await request.read(), is_msgpack(request), VerifyRequest)
    parsed = parse_images(value, keys, request)
    wanted = 1 if value.subject is not None else 2
    if parsed.count != wanted:
        raise BadRequest(
            f"verify takes {wanted} image(s) {'and a subject' if wanted == 1 else ''}, "
            f"got {parsed.count}".replace("  ", " "),
            code="invalid_field",
        )
    faces = await largest_faces(request.app, parsed)
    vecs = []
    for i, item in enumerate(faces):
        if not isinstance(item, NewFace):
            code, message = error_of(item)
            raise Unprocessable(f"image {i}: {message}", code=code)
        vecs.append(item.embedding)
    thr, subject = value.identify_threshold, value.subject
    if subject is not None:
        answer = await svc.read(lambda g: g.verify_subject(vecs[0], subject, thr))
    else:
        answer = await svc.read(lambda g: g.verify(vecs[0], vecs[1], thr))
    out = VerifyResponse(round(answer.similarity, 6), answer.match, answer.threshold, subject)
    return await reply(request, out)


# ---------------------------------------------------------------- snapshots


@routes.get("/gallery/export")
async def export(request: web.Request) -> web.Response:
    def work(g: Gallery) -> tuple[bytes, str]:
        data = snapshots.export_bytes(g)
        return data, hashlib.sha256(data).hexdigest()

    data, digest = await service(request).read(work)
    return web.Response(
        body=data,
        content_type="application/zip",
        headers={
            "Content-Disposition": 'attachment; filename="gallery-snapshot.zip"',
            "X-Snapshot-Sha256": digest,
        },
    )


@routes.post("/gallery/import")
async def import_snapshot(request: web.Request) -> web.Response:
    asked = request.query.get("mode", "merge")
    if asked not in ("merge", "replace"):
        raise BadRequest("'mode' must be merge or replace", code="invalid_field")
    mode: snapshots.ImportMode = "replace" if asked == "replace" else "merge"
    data = await request.read()
    if not data:
        raise BadRequest("request body is empty: send the snapshot file", code="invalid_body")

    def work(g: Gallery) -> tuple[snapshots.ImportResult, tuple[int, int]]:
        snap = snapshots.read(data)
        return snapshots.import_snapshot(g, snap, mode), g.counts()

    result, (subjects, faces) = await service(request).write(work)
    log.info("gallery_imported", mode=mode, faces_added=result.faces_added)
    out = ImportResponse(
        mode, result.subjects_added, result.faces_added, result.faces_skipped, subjects, faces
    )
    return await reply(request, out)


# ---------------------------------------------------------------- wiring


def open_gallery(app: web.Application) -> Gallery:
    settings = app[state.SETTINGS]
    rec = app[state.MODELS].recognizer
    return Gallery(
        settings.gallery_db,
        Recognizer(str(rec["name"]), str(rec["sha256"])),
        threshold=settings.identify_threshold,
        keep_crops=settings.gallery_keep_crops,
        ann_min_faces=settings.gallery_ann_min_faces,
        dim=rec.get("embedding_size"),
    )


async def gallery_ctx(app: web.Application) -> AsyncIterator[None]:
    """After the models: the gallery is bound to the recognizer's name and sha256."""
    metrics = GalleryMetrics(app[state.METRICS])
    gallery: Gallery | None = None
    reason = ""
    try:
        gallery = await asyncio.to_thread(open_gallery, app)
    except (GalleryError, OSError, sqlite3.Error) as exc:
        reason = exc.message if isinstance(exc, GalleryError) else str(exc)
        log.error("gallery_unavailable", path=str(app[state.SETTINGS].gallery_db), reason=reason)
    svc = GalleryService(gallery, reason, app[state.EXECUTOR], metrics)
    app[state.GALLERY] = svc
    if gallery is not None:
        await asyncio.to_thread(svc.refresh_sizes, gallery)
        subjects, faces = svc.sizes
        log.info("gallery_opened", subjects=subjects, faces=faces, index=gallery.index_kind)
    app[state.INFO_PROVIDERS]["gallery"] = functools.partial(gallery_info, svc)
    yield
    if gallery is not None:
        await asyncio.to_thread(gallery.close)


def gallery_info(svc: GalleryService) -> dict[str, object]:
    subjects, faces = svc.sizes
    return {
        "available": svc.available,
        "reason": svc.reason or None,
        "subjects": subjects,
        "faces": faces,
    }


def setup_gallery(app: web.Application) -> None:
    app.cleanup_ctx.append(gallery_ctx)
    app.add_routes(routes)
