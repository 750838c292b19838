"""The wire contract: the generated OpenAPI 3.1 is valid, documents every route and field, and
what the server answers matches it (README examples and InsightFace-REST's request shapes)."""

from __future__ import annotations

import base64
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest
from aiohttp import FormData
from openapi_spec_validator import validate

from appliance.api.wire import ExtractRequest
from tests.helpers import b64, jpeg, png

README = Path(__file__).resolve().parent.parent / "README.md"
FACE_JPEG = jpeg(1280, 960)  # the planted test detector finds 3 faces in any image


def schema_validator(spec: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    return jsonschema.Draft202012Validator(root)


def assert_matches(spec: dict[str, Any], name: str, body: Any) -> None:
    errors = [e.message for e in schema_validator(spec, name).iter_errors(body)]
    assert errors == [], f"{name}: {errors}"


async def test_openapi_is_valid_3_1_and_documents_every_route(serve: Any) -> None:
    client = await serve()
    spec = await (await client.get("/openapi.json")).json()
    validate(spec)  # raises on any violation of the OpenAPI 3.1 schema
    assert spec["openapi"] == "3.1.0"
    routes = {
        r.resource.canonical
        for r in client.server.app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    served = routes - {"/static", "/docs/static"}  # file trees, not operations
    assert served == set(spec["paths"]), served ^ set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for message in ("ConfigMessage", "FrameTag", "ResultMessage", "StatsMessage", "StatusMessage"):
        assert message in schemas
    ws = spec["paths"]["/ws/stream"]["get"]
    assert {"$ref": "#/components/schemas/ResultMessage"} in ws["x-server-messages"]
    # The default that depends on the settings is the settings' value.
    assert schemas["ExtractRequest"]["properties"]["threshold"]["default"] == 0.6
    other = await serve(det_threshold=0.45)
    spec2 = await (await other.get("/openapi.json")).json()
    assert spec2["components"]["schemas"]["ExtractRequest"]["properties"]["threshold"][
        "default"
    ] == pytest.approx(0.45)


# A valid, non-default value for every documented option; the test fails when a field is
# added to the wire type without one here.
SAMPLES: dict[str, Any] = {
    "threshold": 0.5,
    "embed_only": False,
    "return_face_data": True,
    "return_landmarks": True,
    "extract_embedding": False,
    "extract_ga": True,
    "detect_masks": True,
    "limit_faces": 2,
    "min_face_size": 10,
    "verbose_timings": True,
    "msgpack": False,
    "img_req_headers": {"X-Trace": "1"},
    "max_size": [320, 320],
    "subpixel": True,
    "api_ver": "2",
    "identify": True,
}


async def test_every_documented_field_is_accepted_and_every_undocumented_reported(
    serve: Any,
) -> None:
    client = await serve()
    spec = await (await client.get("/openapi.json")).json()
    documented = set(spec["components"]["schemas"]["ExtractRequest"]["properties"]) - {"images"}
    assert documented == set(SAMPLES)
    assert documented | {"images"} == set(ExtractRequest.__struct_fields__)
    images = {"data": [b64(FACE_JPEG)]}
    for name, value in SAMPLES.items():
        resp = await client.post("/extract", json={"images": images, name: value})
        body = await resp.json()
        assert resp.status == 200, (name, body)
        assert not any(name in w and "unknown" in w for w in body.get("warnings", [])), name
        assert_matches(spec, "ExtractResponse", body)
    everything = await client.post("/extract", json={"images": images, **SAMPLES})
    assert everything.status == 200
    assert "unknown" not in str((await everything.json()).get("warnings"))

    odd = {"colour": "red", "Threshold": 0.1, "images_data": [], "nested": {"a": [1, 2]}}
    resp = await client.post("/extract", json={"images": images, **odd})
    warnings = (await resp.json())["warnings"]
    assert [w for w in warnings if w.startswith("unknown")] == [
        f"unknown field '{name}' ignored" for name in sorted(odd)
    ]

    form = FormData()
    form.add_field("images", FACE_JPEG, filename="face.jpg", content_type="image/jpeg")
    for name, value in SAMPLES.items():
        if name != "img_req_headers":  # an object: no form spelling
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value).lower()
            form.add_field(name, text)
    form.add_field("colour", "red")
    resp = await client.post("/multipart/extract", data=form)
    body = await resp.json()
    assert resp.status == 200, body
    assert [w for w in body["warnings"] if w.startswith("unknown")] == [
        "unknown field 'colour' ignored"
    ]
    face = body["data"][0]["faces"][0]
    assert isinstance(face["bbox"][0], float) and len(face["landmarks"]) == 5


def readme_requests() -> list[tuple[str, list[str]]]:
    """(path, curl arguments) of every `curl ... localhost:18080/...` line in the README."""
    text = README.read_text().replace("\\\n", " ")
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    found = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith("curl ") or "localhost:18080" not in line:
                continue
            args = shlex.split(line.replace("$IMG", "IMGPLACEHOLDER"))
            url = next(a for a in args if a.startswith("localhost:18080"))
            found.append((url.removeprefix("localhost:18080"), args))
    return found


def template(spec: dict[str, Any], path: str) -> str:
    """The documented path template (`/gallery/subjects/{subject}`) a concrete path matches."""
    for documented in spec["paths"]:
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", documented), path):
            return str(documented)
    raise AssertionError(f"{path} is not documented")


def test_readme_has_request_examples() -> None:
    paths = [p for p, _ in readme_requests()]
    assert {"/extract", "/draw_detections", "/multipart/extract", "/info"} <= set(paths)


async def test_every_readme_example_answers_in_the_documented_shape(serve: Any) -> None:
    client = await serve()
    spec = await (await client.get("/openapi.json")).json()
    files = {"face.jpg": FACE_JPEG, "group.png": png(1280, 960)}
    image = b64(FACE_JPEG)
    covered: set[tuple[str, str]] = set()
    for path, args in readme_requests():
        headers: dict[str, str] = {}
        data: Any = None
        form: FormData | None = None
        method: str | None = None
        save_as: str | None = None
        it = iter(args[1:])
        for arg in it:
            if arg == "-H":
                key, _, value = next(it).partition(": ")
                headers[key] = value
            elif arg == "-d":
                data = next(it).replace("IMGPLACEHOLDER", image)
            elif arg == "--data-binary":
                data = files[next(it).removeprefix("@")]
            elif arg == "-X":
                method = next(it)
            elif arg == "-o":
                save_as = next(it)
            elif arg == "-F":
                form = form or FormData()
                name, _, value = next(it).partition("=")
                if value.startswith("@"):
                    filename = value[1:]
                    form.add_field(name, files[filename], filename=filename)
                else:
                    form.add_field(name, value)
        body = form if form is not None else data
        method = method or ("GET" if body is None else "POST")
        resp = await client.request(method, path, data=body, headers=headers)
        assert 200 <= resp.status < 300, (path, await resp.text())
        documented = template(spec, path.split("?")[0])
        covered.add((documented, method.lower()))
        operation = spec["paths"][documented][method.lower()]
        content = operation["responses"][str(resp.status)]["content"]
        assert resp.content_type in content, (path, resp.content_type)
        schema = content[resp.content_type].get("schema", {})
        if "$ref" in schema:
            assert_matches(spec, schema["$ref"].rsplit("/", 1)[1], await resp.json())
        if resp.content_type == "image/jpeg":
            assert (await resp.read()).startswith(b"\xff\xd8")
        if save_as is not None:
            files[save_as] = await resp.read()
    gallery_ops = {
        (path, method)
        for path, ops in spec["paths"].items()
        for method in ops
        if path.startswith("/gallery/")
    }
    assert gallery_ops - covered == set(), "gallery operations without a README example"


# InsightFace-REST's documented /extract bodies: its README's example and Python sample
# (`{"images": {"data": [...]}, "max_size": [640, 480]}`), its v2 output switch
# (`'api_ver': '2'`), and the full body its Swagger page shows with every default.
def peer_requests(image: str) -> list[dict[str, Any]]:
    return [
        {"images": {"data": [image, image]}, "max_size": [640, 480]},
        {"images": {"data": [image]}, "max_size": [640, 480], "api_ver": "2"},
        {"images": {"data": [image]}, "max_size": 0},
        {
            "images": {"data": [image], "urls": []},
            "max_size": [640, 640],
            "threshold": 0.6,
            "embed_only": False,
            "return_face_data": False,
            "return_landmarks": False,
            "extract_embedding": True,
            "extract_ga": False,
            "detect_masks": False,
            "limit_faces": 0,
            "min_face_size": 0,
            "verbose_timings": False,
            "msgpack": False,
            "img_req_headers": {},
            "api_ver": "1",
        },
    ]


async def test_insightface_rest_request_shapes_answer_in_the_documented_shape(
    serve: Any,
) -> None:
    client = await serve()
    spec = await (await client.get("/openapi.json")).json()
    for body in peer_requests(b64(FACE_JPEG)):
        resp = await client.post("/extract", json=body)
        answer = await resp.json()
        assert resp.status == 200, (body.keys(), answer)
        assert_matches(spec, "ExtractResponse", answer)
        assert "warnings" not in answer  # nothing the peer documents is unknown here
        assert [len(e["faces"]) for e in answer["data"]] == [3] * len(body["images"]["data"])
        face = answer["data"][0]["faces"][0]
        assert all(isinstance(v, int) for v in face["bbox"]) and isinstance(face["size"], int)
    packed = msgpack.packb({"images": {"data": [FACE_JPEG]}, "msgpack": True}, use_bin_type=True)
    resp = await client.post(
        "/extract", data=packed, headers={"Content-Type": "application/msgpack"}
    )
    assert_matches(spec, "ExtractResponse", msgpack.unpackb(await resp.read()))


async def test_line_wrapped_base64_is_accepted(serve: Any) -> None:
    client = await serve()
    flat = b64(FACE_JPEG)
    wrapped = "\n".join(flat[i : i + 76] for i in range(0, len(flat), 76)) + "\n"
    assert base64.encodebytes(FACE_JPEG).decode() == wrapped  # what `base64 face.jpg` prints
    resp = await client.post("/extract", json={"images": {"data": [wrapped, "\r\n" + flat]}})
    entries = (await resp.json())["data"]
    assert [e["status"] for e in entries] == ["ok", "ok"]
    assert len(entries[0]["faces"]) == 3 and entries[0]["faces"] == entries[1]["faces"]
    bad = await client.post("/extract", json={"images": {"data": [flat[:100] + "*" + flat[100:]]}})
    assert (await bad.json())["data"][0]["code"] == "invalid_base64"
