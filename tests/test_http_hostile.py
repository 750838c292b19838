"""A hostile HTTP and WebSocket corpus against the real server on a real socket (issue 12).

Every input must be answered 2xx or 4xx with the JSON error shape, never 5xx, a hang or a
crash; streams answer an error message or close with a documented code. Each test prints how
many inputs it sent (docs/RELIABILITY.md adds them up).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.api import state
from appliance.api.wire import ExtractRequest, known_fields
from tests.helpers import jpeg
from tests.image_samples import bombs, cmyk_jpeg, encode, noise
from tests.stream_fixtures import eventually

OK_WS_CLOSES = {1000, 1001, 1008, 1009, 1013}  # docs/STREAMS.md; never 1011 from input
FORMATS = {
    "jpeg": encode(".jpg", noise(240, 320)),
    "png": encode(".png", noise(240, 320)),
    "bmp": encode(".bmp", noise(240, 320)),
    "webp": encode(".webp", noise(240, 320)),
}
WRONG_VALUES: list[Any] = [
    None,
    True,
    -1,
    2**70,
    -(2**70),
    1e308,
    -1e308,
    0.5,
    "",
    "x" * 5000,
    "\u0000",
    "1e400",
    "NaN",
    [],
    [1, 2, 3],
    ["a", "b"],
    {},
    {"a": {"b": {"c": []}}},
    [[[[[[[[[[[]]]]]]]]]]],
    "32,32,32",
]


class Tally:
    def __init__(self, name: str) -> None:
        self.name = name
        self.statuses: Counter[int] = Counter()

    def report(self) -> None:
        total = sum(self.statuses.values())
        # 503 only where the test allowed it (floods: overloaded, with Retry-After).
        fives = sum(n for s, n in self.statuses.items() if s >= 500 and s != 503)
        print(
            f"\nhostile {self.name}: {total} inputs, statuses {dict(self.statuses)}, "
            f"5xx other than 503 overloaded = {fives}"
        )
        assert fives == 0


async def send_encoded(
    client: TestClient[Any, Any], tally: Tally, body: Any, encoding: str = "json"
) -> None:
    try:
        request = ENCODINGS[encoding](body)
    except OverflowError:
        return  # msgpack has no integers past 64 bits: such a body cannot be sent in it
    await send(client, tally, *request)


async def send(
    client: TestClient[Any, Any],
    tally: Tally,
    path: str,
    data: bytes,
    ctype: str,
    busy_ok: bool = False,
) -> int:
    resp = await client.post(path, data=data, headers={"Content-Type": ctype})
    body = await resp.read()
    tally.statuses[resp.status] += 1
    # 503 + Retry-After is the designed answer to a flood, and only there.
    busy = busy_ok and resp.status == 503 and "Retry-After" in resp.headers
    assert resp.status < 500 or busy, (path, ctype, data[:200], body[:300])
    if resp.status >= 400:
        error = json.loads(body)["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
    elif resp.content_type == "application/msgpack":
        assert isinstance(msgpack.unpackb(body)["data"], list)
    elif path.endswith("extract"):
        assert isinstance(json.loads(body)["data"], list)
    return resp.status


def multipart(files: list[bytes], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = "hostileboundary"
    out = b""
    for name, value in (fields or {}).items():
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode("utf-8", "surrogatepass")
            + b"\r\n"
        )
    for i, data in enumerate(files):
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


ENCODINGS: dict[str, Callable[[dict[str, Any]], tuple[str, bytes, str]]] = {
    "json": lambda d: ("/extract", json.dumps(d).encode(), "application/json"),
    "msgpack": lambda d: ("/extract", msgpack.packb(d), "application/msgpack"),
}


def as_json_body(images: list[bytes], **options: Any) -> dict[str, Any]:
    return {"images": {"data": [base64.b64encode(i).decode() for i in images]}, **options}


@pytest.fixture
async def client(serve: Any) -> TestClient[Any, Any]:
    # A budget of a few images and small limits, so bombs and floods meet them quickly.
    c: TestClient[Any, Any] = await serve(
        max_image_pixels=4_000_000, max_pixels_in_flight=16_000_000, max_body_bytes=2_000_000
    )
    return c


async def test_truncations_at_every_tenth_of_every_body_and_image(
    client: TestClient[Any, Any],
) -> None:
    tally = Tally("truncations")
    for image in FORMATS.values():
        bodies = {
            "json": ("/extract", json.dumps(as_json_body([image])).encode(), "application/json"),
            "msgpack": (
                "/extract",
                msgpack.packb({"images": {"data": [image]}}),
                "application/msgpack",
            ),
            "multipart": ("/multipart/extract", *multipart([image])),
        }
        for path, raw, ctype in bodies.values():
            for tenth in range(11):
                await send(client, tally, path, raw[: len(raw) * tenth // 10], ctype)
        for tenth in range(11):
            cut = image[: len(image) * tenth // 10]
            for encoder in ENCODINGS.values():
                await send(client, tally, *encoder(as_json_body([cut])))
            await send(client, tally, "/multipart/extract", *multipart([cut]))
            await send(
                client, tally, "/draw_detections", *ENCODINGS["json"](as_json_body([cut]))[1:]
            )
    tally.report()
    assert client.app[state.DECODER].budget.in_use == 0


async def test_bombs_of_every_accepted_format_through_every_encoding(
    client: TestClient[Any, Any],
) -> None:
    tally = Tally("bombs")
    for name, bomb in bombs(4_000_000).items():
        for encoder in ENCODINGS.values():
            path, raw, ctype = encoder(as_json_body([bomb, FORMATS["jpeg"]]))
            assert await send(client, tally, path, raw, ctype) == 200
            resp = await client.post(path, data=raw, headers={"Content-Type": ctype})
            data = (await resp.json())["data"]
            assert data[0]["code"] == "image_too_large", (name, data[0])
            assert data[1]["status"] == "ok"
        await send(client, tally, "/multipart/extract", *multipart([bomb]))
    tally.report()
    budget = client.app[state.DECODER].budget
    assert budget.in_use == 0 and budget.peak <= budget.capacity


async def test_wrong_types_in_every_field_of_every_encoding(client: TestClient[Any, Any]) -> None:
    tally = Tally("wrong-types")
    image = FORMATS["jpeg"]
    fields = sorted(known_fields(ExtractRequest))
    for field in fields:
        for value in WRONG_VALUES:
            body = as_json_body([image]) if field != "images" else {}
            body[field] = value
            for encoding in ENCODINGS:
                await send_encoded(client, tally, body, encoding)
            if field != "images" and isinstance(value, str):
                await send(client, tally, "/multipart/extract", *multipart([image], {field: value}))
    # Wrong types inside `images` too.
    for value in WRONG_VALUES:
        for body in ({"images": {"data": value}}, {"images": {"urls": value}}, {"images": value}):
            for encoding in ENCODINGS:
                await send_encoded(client, tally, body, encoding)
    tally.report()


@settings(
    max_examples=750,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
        max_leaves=20,
    ),
    key=st.sampled_from(["images", "threshold", "max_size", "limit_faces", "x", "data"]),
)
async def test_any_json_value_anywhere_is_a_2xx_or_a_json_4xx(
    client: TestClient[Any, Any], value: Any, key: str
) -> None:
    tally = TALLIES.setdefault("generated-values", Tally("generated-values"))
    for body in (value, {key: value}, {"images": {"data": value}}, {"images": {"data": [value]}}):
        await send(client, tally, *ENCODINGS["json"](body))


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    raw=st.binary(max_size=300),
    target=st.sampled_from(
        [
            ("/extract", "application/json"),
            ("/extract", "application/msgpack"),
            ("/multipart/extract", "multipart/form-data; boundary=hostileboundary"),
            ("/multipart/extract", "multipart/form-data"),
            ("/draw_detections", "application/json"),
            ("/extract", "text/plain"),
        ]
    ),
)
async def test_any_bytes_with_any_content_type_is_a_json_4xx(
    client: TestClient[Any, Any], raw: bytes, target: tuple[str, str]
) -> None:
    tally = TALLIES.setdefault("generated-bytes", Tally("generated-bytes"))
    await send(client, tally, target[0], raw, target[1])


TALLIES: dict[str, Tally] = {}


def test_generated_inputs_had_no_5xx() -> None:
    """Prints the generated tests' totals (they run before this one in file order)."""
    for tally in TALLIES.values():
        tally.report()


async def test_flood_of_bad_and_good_requests_at_once(client: TestClient[Any, Any]) -> None:
    tally = Tally("flood")
    good = ENCODINGS["json"](as_json_body([FORMATS["jpeg"]] * 2))
    bad = ("/extract", b'{"images": {"data": [' * 50, "application/json")
    statuses = await asyncio.gather(
        *(send(client, tally, *(good if i % 3 == 0 else bad), busy_ok=True) for i in range(300))
    )
    tally.report()
    assert set(statuses) <= {200, 400, 503}
    assert statuses.count(200) > 0
    assert client.app[state.DECODER].budget.in_use == 0


async def test_stream_oversize_frames_garbage_and_floods_close_with_documented_codes(
    serve: Any,
) -> None:
    client = await serve(max_frame_bytes=1024 * 1024, stream_max_bad_frames=1000)
    tally: Counter[str] = Counter()
    # Oversize frame: 1009.
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_bytes(b"\xff\xd8\xff" + b"\0" * (2 * 1024 * 1024))
        msg = await ws.receive(timeout=10)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=10)
        tally["oversize"] += 1
        assert ws.close_code == 1009 or msg.data == 1009
    # Garbage frames and messages, a flood of them: error messages, the stream stays usable.
    async with client.ws_connect("/ws/stream") as ws:
        texts = ["", "{", "[]", '{"type": 1}', '{"type": "frame", "seq": 1e400}', "\ud800x"]
        frames = [b"", b"\xff\xd8\xff", b"GIF89a", b"\x89PNG\r\n\x1a\n", jpeg(64, 64)[:100]]
        for i in range(600):
            if i % 2:
                await ws.send_str(texts[i % len(texts)].encode("utf-8", "replace").decode())
            else:
                await ws.send_bytes(frames[i % len(frames)])
            tally["garbage"] += 1
        await ws.send_bytes(jpeg())
        while True:
            msg = await ws.receive(timeout=20)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            if json.loads(msg.data)["type"] == "result":
                break
    total = sum(tally.values())
    print(f"\nhostile streams: {total} inputs, closes as documented, 1011 = 0")


async def test_stream_disconnect_mid_frame_leaves_the_server_serving(serve: Any) -> None:
    client = await serve()
    host, port = client.server.host, client.server.port
    cuts = 0
    for cut in (1, 2, 6, 100, 1000):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"GET /ws/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await reader.readuntil(b"\r\n\r\n")
        payload = jpeg(320, 240)
        # A masked binary frame header announcing the whole JPEG, then only `cut` bytes of it.
        header = b"\x82\xfe" + struct.pack(">H", min(len(payload), 65535)) + b"\0\0\0\0"
        writer.write(header + payload[:cut])
        await writer.drain()
        writer.close()
        cuts += 1
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_bytes(jpeg())
        while json.loads((await ws.receive(timeout=20)).data)["type"] != "result":
            pass
        # The cut connections left the registry; only this stream is open.
        await eventually(lambda: len(client.app[state.STREAMS].streams) == 1)
    print(f"\nhostile mid-frame disconnects: {cuts} inputs, server still serving")


@pytest.mark.parametrize(
    ("case", "ctype", "make"),
    [
        ("no boundary", "multipart/form-data", lambda body: body),
        ("wrong boundary", "multipart/form-data; boundary=other", lambda body: body),
        ("no closing boundary", None, lambda body: body[: -len("--hostileboundary--\r\n")]),
        (
            "200 KB part header",
            None,
            lambda body: body.replace(
                b"Content-Type: application/octet-stream",
                b"X-Padding: " + b"a" * 200_000 + b"\r\nContent-Type: application/octet-stream",
            ),
        ),
    ],
)
async def test_defect3_malformed_multipart_is_a_json_400(
    client: TestClient[Any, Any], case: str, ctype: str | None, make: Callable[[bytes], bytes]
) -> None:
    body, good_type = multipart([FORMATS["jpeg"]])
    resp = await client.post(
        "/multipart/extract", data=make(body), headers={"Content-Type": ctype or good_type}
    )
    assert resp.status == 400, case
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_multipart", (case, error)
    assert error["message"].startswith("malformed multipart body: ")


async def test_defect6_multipart_parts_together_are_bounded_by_max_body_bytes(
    serve: Any,
) -> None:
    client = await serve(max_body_bytes=1_000_000)
    part = FORMATS["png"][:200_000]
    assert len(part) == 200_000
    # Six parts of 200 KB: each under the limit, together over it.
    body, ctype = multipart([part] * 6)
    resp = await client.post("/multipart/extract", data=body, headers={"Content-Type": ctype})
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert error["code"] == "payload_too_large"
    assert "all parts together" in error["message"]
    # Four of them fit: parsed, and each answered on its own (cut PNGs: corrupt_image).
    body, ctype = multipart([part] * 4)
    resp = await client.post("/multipart/extract", data=body, headers={"Content-Type": ctype})
    assert resp.status == 200
    assert [d["code"] for d in (await resp.json())["data"]] == ["corrupt_image"] * 4


async def test_odd_images_through_http_are_answered_per_image(
    client: TestClient[Any, Any],
) -> None:
    import numpy as np

    odd = {
        "cmyk_jpeg": (cmyk_jpeg(), "ok"),
        "png_16bit": (encode(".png", (noise(40, 60).astype(np.uint16) * 257)), "ok"),
        "png_1x1": (encode(".png", noise(1, 1)), "ok"),
        "grey_png": (encode(".png", noise(40, 60, channels=1)), "ok"),
        "gif": (b"GIF89a" + b"\x01\x00\x01\x00" + b"\0" * 20, "unsupported_format"),
        "tiff": (encode(".tiff", noise(40, 60)), "unsupported_format"),
    }
    tally = Tally("odd-images")
    for name, (data, expected) in odd.items():
        for encoding in ENCODINGS:
            path, raw, ctype = ENCODINGS[encoding](as_json_body([data]))
            resp = await client.post(path, data=raw, headers={"Content-Type": ctype})
            tally.statuses[resp.status] += 1
            assert resp.status == 200, name
            entry = (await resp.json())["data"][0]
            assert entry.get("code", entry["status"]) == expected, (name, entry)
    tally.report()
