"""Hostile bodies and messages: every one is a 4xx JSON error (REST) or an error message / a
1008 close (WebSocket), never a 500 or a close 1000 after an exception; the server keeps
serving afterwards."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.api.errors import BadRequest
from appliance.api.request_body import parse_body
from appliance.api.stream_protocol import (
    BadConfig,
    BadMessage,
    ConfigMessage,
    FrameTag,
    StreamConfig,
    decode_client_message,
)
from appliance.api.wire import ExtractRequest
from appliance.config import load_settings
from tests.helpers import b64, jpeg
from tests.stream_fixtures import close_message, receive_until

IMAGE = b64(jpeg(160, 120))
DEEP = b"[" * 10_000 + b"]" * 10_000
HUGE_INT = b"9" * 4_400  # past CPython's 4300-digit int() limit
INT_400 = b"1" + b"0" * 400  # overflows float() and any int64
SETTINGS = load_settings(env={})


def body_with(field: bytes, value: bytes) -> bytes:
    return b'{"images": {"data": ["' + IMAGE.encode() + b'"]}, "' + field + b'": ' + value + b"}"


JSON_CASES = {
    "deep nesting in an unknown field": body_with(b"x", DEEP),
    "deep nesting as the body": DEEP,
    "deep nesting in images": b'{"images": ' + DEEP + b"}",
    "4400-digit limit_faces": body_with(b"limit_faces", HUGE_INT),
    "4400-digit threshold": body_with(b"threshold", HUGE_INT),
    "1e400 threshold": body_with(b"threshold", b"1e400"),
    "-1e400 threshold": body_with(b"threshold", b"-1e400"),
    "400-digit threshold": body_with(b"threshold", INT_400),
    "400-digit limit_faces": body_with(b"limit_faces", INT_400),
    "400-digit max_size": body_with(b"max_size", b"[" + INT_400 + b", 640]"),
    "1e400 max_size": body_with(b"max_size", b"[1e400, 640]"),
    "1e400 as a string threshold": body_with(b"threshold", b'"1e400"'),
    "400-digit string limit_faces": body_with(b"limit_faces", b'"' + INT_400 + b'"'),
    "NaN threshold": body_with(b"threshold", b"NaN"),
    "lone surrogate in an unknown key, msgpack answer": b'{"images": {"data": ["'
    + IMAGE.encode()
    + b'"]}, "msgpack": true, "\\ud800x": 1}',
    "lone surrogate in a value": body_with(b"api_ver", b'"\\udfff"'),
    "no images at all": b'{"threshold": 0.5}',
    "a number as an image": b'{"images": {"data": [1]}}',
    "null as an image": b'{"images": {"data": [null]}}',
    "an object as an image": b'{"images": {"data": [{"a": 1}]}}',
}


@pytest.mark.parametrize("body", JSON_CASES.values(), ids=JSON_CASES.keys())
async def test_malformed_json_is_a_4xx_json_error(serve: Any, body: bytes) -> None:
    client = await serve()
    resp = await client.post("/extract", data=body, headers={"Content-Type": "application/json"})
    assert 400 <= resp.status < 500
    error = (await resp.json())["error"]
    assert error["code"] in {"invalid_json", "invalid_field", "invalid_body"}
    assert error["message"]
    ok = await client.post("/extract", json={"images": {"data": [IMAGE]}})
    assert ok.status == 200


def msgpack_map(extra: bytes, entries: int) -> bytes:
    """A msgpack map {"images": {"data": [IMAGE]}, <extra>} built by hand (fixmap header)."""
    images = msgpack.packb("images") + msgpack.packb({"data": [IMAGE]})
    return bytes([0x80 | entries]) + images + extra


MSGPACK_CASES = {
    # str8 key holding the UTF-8 encoding of a lone surrogate (invalid UTF-8).
    "lone surrogate key": msgpack_map(b"\xd9\x03\xed\xa0\x80" + msgpack.packb(1), 2),
    "uint64 max limit_faces": msgpack_map(msgpack.packb("limit_faces") + b"\xcf" + b"\xff" * 8, 2),
    "inf threshold": msgpack_map(msgpack.packb("threshold") + msgpack.packb(float("inf")), 2),
    "deep nesting": msgpack_map(msgpack.packb("x") + b"\x91" * 10_000 + b"\xc0", 2),
    "an integer as an image": msgpack.packb({"images": {"data": [7]}}),
}


@pytest.mark.parametrize("body", MSGPACK_CASES.values(), ids=MSGPACK_CASES.keys())
async def test_malformed_msgpack_is_a_4xx_json_error(serve: Any, body: bytes) -> None:
    client = await serve()
    resp = await client.post("/extract", data=body, headers={"Content-Type": "application/msgpack"})
    assert 400 <= resp.status < 500
    assert (await resp.json())["error"]["code"] in {"invalid_msgpack", "invalid_field"}


async def test_multipart_overflowing_numbers_are_400(serve: Any) -> None:
    client = await serve()
    for name, value in (
        ("threshold", "1e400"),
        ("limit_faces", INT_400.decode()),
        ("max_size", f"{INT_400.decode()},640"),
    ):
        form = aiohttp.FormData()
        form.add_field("images", jpeg(160, 120), filename="a.jpg")
        form.add_field(name, value)
        resp = await client.post("/multipart/extract", data=form)
        assert resp.status == 400, name
        assert (await resp.json())["error"]["code"] == "invalid_field"


async def test_undecodable_form_field_name_is_echoed_safely_in_msgpack(serve: Any) -> None:
    client = await serve()
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + jpeg(160, 120)
    for name, value in ((b"msgpack", b"true"), (b"k\xed\xa0\x80", b"1")):
        body += (
            f"\r\n--{boundary}\r\n".encode()
            + b'Content-Disposition: form-data; name="'
            + name
            + b'"\r\n\r\n'
            + value
        )
    body += f"\r\n--{boundary}--\r\n".encode()
    resp = await client.post(
        "/multipart/extract",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert resp.status == 200, await resp.text()
    warnings = msgpack.unpackb(await resp.read())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("unknown field 'k")


def is_type(kind: str) -> Any:
    return lambda m: m["type"] == kind


WS_ERROR_CASES = {
    "deep nesting": "[" * 10_000 + "]" * 10_000,
    "deep nesting in an object": '{"type": "frame", "x": ' + "[" * 10_000 + "]" * 10_000 + "}",
    "400-digit seq": '{"type": "frame", "seq": ' + INT_400.decode() + "}",
    "4400-digit seq": '{"type": "frame", "seq": ' + HUGE_INT.decode() + "}",
    "1e400 ts": '{"type": "frame", "seq": 1, "ts": 1e400}',
    "lone surrogate type": '{"type": "\\ud800"}',
    "not JSON": "{nope",
}


@pytest.mark.parametrize("text", WS_ERROR_CASES.values(), ids=WS_ERROR_CASES.keys())
async def test_malformed_stream_message_gets_an_error_message(serve: Any, text: str) -> None:
    client = await serve()
    async with client.ws_connect("/ws/stream") as ws:
        await receive_until(ws, is_type("status"))
        await ws.send_str(text)
        error, _ = await receive_until(ws, is_type("error"))
        assert error["error"] and error["seq"] is None
        # The stream still works.
        await ws.send_str('{"type": "frame", "seq": 7}')
        await ws.send_bytes(jpeg(160, 120))
        result, _ = await receive_until(ws, is_type("result"))
        assert result["seq"] == 7


WS_CONFIG_CASES = {
    "1e400 threshold": '{"type": "config", "threshold": 1e400}',
    "400-digit limit_faces": '{"type": "config", "limit_faces": ' + INT_400.decode() + "}",
    "4400-digit max_fps": '{"type": "config", "max_fps": ' + HUGE_INT.decode() + "}",
    "1e400 max_fps": '{"type": "config", "max_fps": 1e400}',
    "400-digit max_size": '{"type": "config", "max_size": [' + INT_400.decode() + ", 64]}",
}


@pytest.mark.parametrize("text", WS_CONFIG_CASES.values(), ids=WS_CONFIG_CASES.keys())
async def test_malformed_stream_config_closes_with_1008(serve: Any, text: str) -> None:
    client = await serve()
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_str(text)
        _, reason = await close_message(ws)
        assert ws.close_code == 1008
        assert reason.startswith("bad config: ")


# Any JSON value in any field, known or not: the parser answers a result or a BadRequest,
# never another exception (which the middleware would turn into a 500).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)  # msgpack has no wider ints; JSON ones: cases above
    | st.floats(allow_nan=False)
    | st.text()
    | st.sampled_from(["1e400", "9" * 500, "640,640", "true", "0"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from([*ExtractRequest.__struct_fields__, "colour", "images.data", ""])


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(fields, json_values, max_size=6),
    images=st.one_of(json_values, st.just({"data": [IMAGE]})),
    as_msgpack=st.booleans(),
)
def test_any_body_is_parsed_or_refused_with_a_400(
    body: dict[str, Any], images: Any, as_msgpack: bool
) -> None:
    payload = {"images": images, **body}
    raw = msgpack.packb(payload) if as_msgpack else json.dumps(payload).encode()
    try:
        parsed = parse_body(raw, as_msgpack, SETTINGS)
    except BadRequest as exc:
        assert (exc.status == 400 and exc.code.startswith("invalid_")) or exc.code in {
            "no_images",
            "too_many_images",
        }
    else:
        assert parsed.count >= 1 and 0 <= parsed.threshold <= 1


stream_fields = st.sampled_from([*ConfigMessage.__struct_fields__, "type", "seq", "ts", "x"])


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["config", "frame", "other", None]),
    body=st.dictionaries(stream_fields, json_values, max_size=6),
)
def test_any_stream_message_is_decoded_or_refused(kind: str | None, body: dict[str, Any]) -> None:
    message = {**body, "type": kind} if kind is not None else body
    try:
        decoded = decode_client_message(json.dumps(message), 0.6, (640, 640), 30.0)
    except (BadConfig, BadMessage):
        return
    assert isinstance(decoded, (StreamConfig, FrameTag))
