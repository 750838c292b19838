"""The /gallery/* wire contract: every documented request field is accepted, every answer
matches its documented schema, in JSON and msgpack (generated test models: the planted
detector finds 3 faces in any image)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from tests.helpers import b64
from tests.test_contract import FACE_JPEG, SAMPLES, assert_matches

VEC = [0.01 * (i % 7 + 1) for i in range(512)]  # the test recognizer's length
IMAGE = b64(FACE_JPEG)

# A valid, non-default value for every documented field of each request type; the test fails
# when a field is added to a wire type without one here.
BODIES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "CreateSubject": (
        "post",
        "/gallery/subjects",
        "SubjectOut",
        {"subject": "ada", "metadata": {"k": [1, 2]}, "external_id": "e-1"},
    ),
    "UpdateSubject": (
        "patch",
        "/gallery/subjects/ada",
        "SubjectOut",
        {"metadata": {"k": 3}, "external_id": "e-9"},
    ),
    "EnrolEmbeddings": (
        "post",
        "/gallery/subjects/ada/faces",
        "EnrolResponse",
        {"embeddings": [VEC, VEC[::-1]]},
    ),
    "BulkRequest": (
        "post",
        "/gallery/bulk",
        "BulkResponse",
        {
            "subjects": [
                {
                    "subject": "bob",
                    "external_id": "e-2",
                    "metadata": {"x": 1},
                    "images": [IMAGE],
                    "embeddings": [VEC],
                }
            ],
            "threshold": 0.5,
        },
    ),
    "SearchRequest": (
        "post",
        "/gallery/search",
        "ExtractResponse",
        {"images": {"data": [IMAGE]}, **SAMPLES, "top_k": 2, "identify_threshold": 0.3},
    ),
    "VerifyRequest": (
        "post",
        "/gallery/verify",
        "VerifyResponse",
        {
            "images": {"data": [IMAGE]},
            **SAMPLES,
            "subject": "bob",
            "identify_threshold": 0.3,
        },
    ),
}


@pytest.mark.parametrize("packed", [False, True])
async def test_every_documented_gallery_field_is_accepted(serve: Any, packed: bool) -> None:
    client = await serve()
    spec = await (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    for name, (method, path, answer, body) in BODIES.items():
        documented = set(schemas[name]["properties"])
        assert documented == set(body), (name, documented ^ set(body))
        if packed:
            data = msgpack.packb(body)
            headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
            resp = await client.request(method, path, data=data, headers=headers)
            result = msgpack.unpackb(await resp.read())
        else:
            resp = await client.request(method, path, json=body)
            result = await resp.json()
        assert resp.status in (200, 201), (name, result)
        assert "warnings" not in result or not any("unknown" in w for w in result["warnings"])
        assert_matches(spec, answer, result)
        if answer == "ExtractResponse":
            face = result["data"][0]["faces"][0]
            assert len(face["matches"]) == 2 and face["identity"] in ("ada", "bob", None)
    listing = await (await client.get("/gallery/subjects")).json()
    assert_matches(spec, "SubjectList", listing)
    assert {s["subject"]: s["face_count"] for s in listing["subjects"]} == {"ada": 2, "bob": 2}


async def test_gallery_errors_have_their_statuses(serve: Any) -> None:
    client = await serve()
    assert (await client.post("/gallery/subjects", json={"subject": "ada"})).status == 201
    cases = [
        ("post", "/gallery/subjects", {"subject": "ada"}, 409, "subject_exists"),
        ("get", "/gallery/subjects/nobody", None, 404, "subject_not_found"),
        ("delete", "/gallery/faces/99", None, 404, "face_not_found"),
        ("post", "/gallery/subjects", {"subject": ""}, 400, "invalid_field"),
        (
            "post",
            "/gallery/subjects/ada/faces",
            {"embeddings": [[0.0] * 512]},
            400,
            "invalid_embedding",
        ),
        ("post", "/gallery/subjects", {"subject": "x", "external_id": None, "top": 1}, 201, None),
        ("post", "/gallery/subjects", {"subject": "y", "external_id": "e"}, 201, None),
        (
            "post",
            "/gallery/subjects",
            {"subject": "z", "external_id": "e"},
            409,
            "external_id_exists",
        ),
        ("post", "/gallery/import", None, 400, "invalid_body"),
        ("get", "/gallery/subjects?limit=0", None, 400, "invalid_field"),
    ]
    for method, path, body, status, code in cases:
        resp = await client.request(method, path, json=body)
        answer = await resp.json()
        assert resp.status == status, (path, body, answer)
        if code is not None:
            assert answer["error"]["code"] == code, (path, answer)


async def test_gallery_writes_need_the_token(serve: Any) -> None:
    client = await serve(api_token="s3cret")
    resp = await client.post("/gallery/subjects", json={"subject": "ada"})
    assert resp.status == 401
    ok = await client.post(
        "/gallery/subjects", json={"subject": "ada"}, headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status == 201


async def test_an_unusable_gallery_db_is_a_clear_503_and_extract_still_works(
    serve: Any, tmp_path: Any
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    client = await serve(gallery_db=blocker / "gallery.db")
    resp = await client.get("/gallery/subjects")
    error = (await resp.json())["error"]
    assert resp.status == 503 and error["code"] == "gallery_unavailable"
    info = await (await client.get("/info")).json()
    assert info["gallery"]["available"] is False and info["gallery"]["reason"]
    resp = await client.post("/extract", json={"images": {"data": [IMAGE]}})
    assert resp.status == 200
