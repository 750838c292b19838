"""The `/gallery/*` part of `/openapi.json`: paths and status codes; the schemas come from
the wire types in `api/gallery_wire.py`."""

from __future__ import annotations

from typing import Any

from appliance.api.gallery_wire import REQUEST_TYPES, RESPONSE_TYPES

TYPES: tuple[type, ...] = (*REQUEST_TYPES, *RESPONSE_TYPES)
REF = "#/components/schemas/{name}"

# On top of the statuses every operation shares (`openapi.ERROR_STATUSES`: 401, 408, 413...).
GALLERY_ERRORS = {
    "400": "invalid body or field; `invalid_embedding`, `recognizer_mismatch`, "
    "`snapshot_invalid`...",
    "422": "an image that cannot be used (`empty_image`, `corrupt_image`, `no_face`...)",
    "404": "`subject_not_found` or `face_not_found`",
    "409": "`subject_exists` or `external_id_exists`",
    "503": "`gallery_unavailable` (GALLERY_DB cannot be opened), overloaded or paused",
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def typed(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": ref(name)}, "application/msgpack": {"schema": ref(name)}}


def gallery_paths(common_errors: dict[str, str]) -> dict[str, Any]:
    error = {"application/json": {"schema": ref("ErrorResponse")}}
    statuses = {**common_errors, **GALLERY_ERRORS}
    errors = {code: {"description": t, "content": error} for code, t in sorted(statuses.items())}

    def op(
        op_id: str,
        summary: str,
        ok: str,
        body: str | None = None,
        status: str = "200",
        params: list[dict[str, Any]] | None = None,
        content: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "responses": {status: {"description": ok, "content": content or typed(ok)}, **errors},
        }
        if body is not None:
            out["requestBody"] = {"required": True, "content": typed(body)}
        if params:
            out["parameters"] = params
        return out

    def path_param(name: str, kind: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "schema": {"type": kind}}

    def query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema}

    subject = [path_param("subject", "string")]
    enrol = op(
        "gallery_add_faces",
        "Enrol the largest face of each image (or embeddings) for a subject",
        "EnrolResponse",
        status="201",
        params=subject,
    )
    enrol["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"oneOf": [ref("ExtractRequest"), ref("EnrolEmbeddings")]}
            },
            "application/msgpack": {
                "schema": {"oneOf": [ref("ExtractRequest"), ref("EnrolEmbeddings")]}
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["images"],
                }
            },
        },
    }
    enrol["responses"]["200"] = {
        "description": "no image gave a face: one error entry each",
        "content": typed("EnrolResponse"),
    }
    zip_content = {"application/zip": {"schema": {"type": "string", "format": "binary"}}}
    importer = op(
        "gallery_import",
        "Import a snapshot (merge or replace); refused for another recognizer",
        "ImportResponse",
        params=[query("mode", {"enum": ["merge", "replace"], "default": "merge"})],
    )
    # The route reads the body's bytes whatever their declared type: a plain upload
    # (`curl --data-binary @file`) says application/octet-stream.
    binary = {"schema": {"type": "string", "format": "binary"}}
    importer["requestBody"] = {
        "required": True,
        "content": {**zip_content, "application/octet-stream": binary},
    }
    return {
        "/gallery/subjects": {
            "post": op(
                "gallery_create_subject", "Create a subject", "SubjectOut", "CreateSubject", "201"
            ),
            "get": op(
                "gallery_list_subjects",
                "Subjects with face counts, paged",
                "SubjectList",
                params=[
                    query("offset", {"type": "integer", "minimum": 0, "default": 0}),
                    query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                ],
            ),
        },
        "/gallery/subjects/{subject}": {
            "get": op(
                "gallery_get_subject", "A subject and its faces", "SubjectDetail", params=subject
            ),
            "patch": op(
                "gallery_update_subject",
                "Change metadata or external id",
                "SubjectOut",
                "UpdateSubject",
                params=subject,
            ),
            "delete": op(
                "gallery_delete_subject",
                "Delete a subject and all its faces, for good",
                "SubjectDeleted",
                params=subject,
            ),
        },
        "/gallery/subjects/{subject}/faces": {"post": enrol},
        "/gallery/faces/{face_id}": {
            "delete": op(
                "gallery_delete_face",
                "Delete one face, for good",
                "FaceDeleted",
                params=[path_param("face_id", "integer")],
            )
        },
        "/gallery/bulk": {
            "post": op(
                "gallery_bulk",
                "Enrol many subjects (created when missing) in one transaction",
                "BulkResponse",
                "BulkRequest",
                "201",
            )
        },
        "/gallery/search": {
            "post": op(
                "gallery_search",
                "Detect faces and search each in the gallery (identity or null, matches)",
                "ExtractResponse",
                "SearchRequest",
            )
        },
        "/gallery/verify": {
            "post": op(
                "gallery_verify",
                "1:1: two images, or an image and a subject",
                "VerifyResponse",
                "VerifyRequest",
            )
        },
        "/gallery/export": {
            "get": op(
                "gallery_export",
                "The whole gallery as one snapshot file (crops never included)",
                "snapshot",
                content=zip_content,
            )
        },
        "/gallery/import": {"post": importer},
    }
