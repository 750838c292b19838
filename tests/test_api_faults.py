"""Faults through the real server (issue 12): a backend raising mid-batch, start-up failures,
a model changed on disk, admission (pixel budget per request) and sibling cancellation."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from aiohttp import web
from aiohttp.test_utils import TestServer

from appliance.api import state
from appliance.api.admission import run_all
from appliance.api.app import create_app
from appliance.api.errors import StartupError
from appliance.backends.ort import OnnxRuntimeBackend
from appliance.models import loader
from tests.conftest import DET_MODEL, REC_MODEL, write_models
from tests.helpers import b64, jpeg
from tests.stream_fixtures import close_message, metric, receive_until


class FailingInfer:
    """Fault injection at the backend boundary: the real ONNX Runtime backend, whose next
    `fail` calls raise as a device error would."""

    def __init__(self) -> None:
        self.fail = 0
        self.calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = OnnxRuntimeBackend.infer
        injector = self

        def infer(backend: OnnxRuntimeBackend, batch: Any) -> Any:
            injector.calls += 1
            if injector.fail > 0:
                injector.fail -= 1
                raise RuntimeError("injected device fault")
            return real(backend, batch)

        monkeypatch.setattr(OnnxRuntimeBackend, "infer", infer)


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> Iterator[FailingInfer]:
    injector = FailingInfer()
    injector.install(monkeypatch)
    yield injector


def body(*images: bytes) -> dict[str, Any]:
    return {"images": {"data": [b64(i) for i in images]}}


async def test_faults_backend_raising_mid_batch_fails_that_request_with_error_id_in_log(
    serve: Any, failing: FailingInfer
) -> None:
    client = await serve()
    failing.fail = 1
    with structlog.testing.capture_logs() as logs:
        resp = await client.post("/extract", json=body(jpeg()))
        payload = await resp.json()
    assert resp.status == 500
    assert payload["error"]["code"] == "internal_error"
    error_id = re.search(r"error id ([0-9a-f]{12})", payload["error"]["message"])
    assert error_id is not None, payload
    logged = [e for e in logs if e.get("error_id") == error_id.group(1)]
    assert [e["event"] for e in logged] == ["unhandled_error"]
    # The next batch runs: the fault was one batch's, not the batcher's.
    resp = await client.post("/extract", json=body(jpeg()))
    assert resp.status == 200
    assert (await resp.json())["data"][0]["status"] == "ok"
    assert client.app[state.DECODER].budget.in_use == 0


async def test_defect4_stream_worker_failure_closes_1011_and_logs_the_stream_id(
    serve: Any, failing: FailingInfer
) -> None:
    client = await serve()
    with structlog.testing.capture_logs() as logs:
        async with client.ws_connect("/ws/stream") as ws:
            await receive_until(ws, lambda m: m["type"] == "status")
            failing.fail = 1
            await ws.send_bytes(jpeg())
            code, reason = await close_message(ws)
    assert code == 1011
    assert "RuntimeError" in reason
    failed = [e for e in logs if e["event"] == "stream_task_failed"]
    assert len(failed) == 1 and failed[0]["stream_id"].startswith("s")
    assert client.app[state.DECODER].budget.in_use == 0


async def test_defect4_stream_frame_past_the_pixel_budget_is_dropped_busy_worker_lives(
    serve: Any,
) -> None:
    # The budget holds one 640x480 frame: while a REST request holds it, a stream frame is busy.
    client = await serve(
        max_image_pixels=640 * 480, max_pixels_in_flight=640 * 480, stream_stats_interval_s=0.1
    )
    budget = client.app[state.DECODER].budget
    async with client.ws_connect("/ws/stream") as ws:
        await receive_until(ws, lambda m: m["type"] == "status")
        held = budget.reserve(640 * 480)
        await ws.send_bytes(jpeg())
        stats, _ = await receive_until(ws, lambda m: m["type"] == "stats" and m["dropped_busy"])
        assert stats["dropped_busy"] == 1 and stats["processed"] == 0
        text = await (await client.get("/metrics")).text()
        held.release()
        await ws.send_bytes(jpeg(seed=1))
        result, _ = await receive_until(ws, lambda m: m["type"] == "result")
    assert result["faces"], result
    assert metric(text, "appliance_pixels_in_flight") == 640 * 480
    assert metric(text, "appliance_pixels_in_flight_limit") == 640 * 480
    assert budget.in_use == 0


async def test_defect2_pixels_are_held_per_request_and_past_the_budget_answer_503(
    serve: Any,
) -> None:
    # MAX_PIXELS_IN_FLIGHT of one image: a request of two is refused at its second image
    # (the first still holds its pixels), with Retry-After, and holds nothing afterwards.
    client = await serve(
        max_image_pixels=640 * 480, max_pixels_in_flight=640 * 480, request_image_concurrency=2
    )
    budget = client.app[state.DECODER].budget
    resp = await client.post("/extract", json=body(jpeg(), jpeg(seed=1)))
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["code"] == "overloaded"
    assert budget.in_use == 0 and budget.peak == 640 * 480
    text = await (await client.get("/metrics")).text()
    assert metric(text, "appliance_queue_rejections_total", model="decode") == 1
    assert metric(text, "appliance_pixels_in_flight") == 0
    # One image at a time fits: released after each, never above capacity.
    ok = await serve(
        max_image_pixels=640 * 480, max_pixels_in_flight=640 * 480, request_image_concurrency=1
    )
    resp = await ok.post("/extract", json=body(*(jpeg(seed=i) for i in range(6))))
    assert resp.status == 200
    assert [d["status"] for d in (await resp.json())["data"]] == ["ok"] * 6
    assert ok.app[state.DECODER].budget.peak == 640 * 480
    assert ok.app[state.DECODER].budget.in_use == 0


async def test_defect5_one_503_stops_the_rest_of_the_request(
    serve: Any, failing: FailingInfer
) -> None:
    # A budget of two images, 24 images, 4 at a time: images 0 and 1 hold the budget, image 2
    # is refused. The 503 cancels 0 and 1 mid-decode and 3.. before they start: when the
    # answer arrives nothing of the request holds pixels or reaches the detector. (With
    # gather, 0 and 1 would still be running, holding their pixels, and 3.. would follow.)
    client = await serve(
        max_image_pixels=640 * 480, max_pixels_in_flight=2 * 640 * 480, request_image_concurrency=4
    )
    budget = client.app[state.DECODER].budget
    resp = await client.post("/extract", json=body(*(jpeg(seed=i) for i in range(24))))
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "overloaded"
    assert budget.in_use == 0 and budget.peak == 2 * 640 * 480
    assert failing.calls == 0
    # The server is not left busy: a request of two images (what the budget holds) succeeds.
    resp = await client.post("/extract", json=body(jpeg(), jpeg(seed=1)))
    assert resp.status == 200


async def test_run_all_cancels_siblings_at_the_first_failure() -> None:
    started: list[int] = []
    cancelled: list[int] = []

    def job(i: int) -> Any:
        async def run() -> int:
            started.append(i)
            try:
                if i == 1:
                    raise ValueError("boom")
                await asyncio.sleep(10)
                return i
            except asyncio.CancelledError:
                cancelled.append(i)
                raise

        return run

    with pytest.raises(ValueError, match="boom"):
        await run_all([job(i) for i in range(10)], limit=3)
    # The failure's freed slot may let one more start before the cancel; the rest never do.
    assert started[:3] == [0, 1, 2] and len(started) <= 4
    assert sorted(cancelled) == sorted(set(started) - {1})
    assert await run_all([lambda i=i: asyncio.sleep(0, i) for i in range(5)], limit=2) == [
        0,
        1,
        2,
        3,
        4,
    ]


async def test_defect7_backends_loaded_before_a_startup_failure_are_closed(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[loader.LoadedModels] = []
    real_load = loader.load_models

    def spy(settings: Any) -> loader.LoadedModels:
        seen.append(real_load(settings))
        return seen[-1]

    monkeypatch.setattr("appliance.api.app.load_models", spy)

    async def later_context_fails(app: web.Application) -> Any:
        raise StartupError("a later start-up step failed")
        yield  # pragma: no cover

    app = create_app(make_settings())
    app.cleanup_ctx.append(later_context_fails)
    server = TestServer(app, host="127.0.0.1")
    with pytest.raises(StartupError):
        await server.start_server()
    await server.close()
    assert len(seen) == 1
    for model in (seen[0].detector, seen[0].recognizer):
        assert not hasattr(model.backend, "_session"), "backend left open"

    # A failure between loading and serving (building the analyzer) closes them too.
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("analyzer cannot be built")

    monkeypatch.setattr("appliance.models.loader.FaceAnalyzer", broken)
    server = TestServer(create_app(make_settings()), host="127.0.0.1")
    with pytest.raises(RuntimeError, match="analyzer"):
        await server.start_server()
    await server.close()
    assert len(seen) == 2
    assert not hasattr(seen[1].detector.backend, "_session")
    assert not hasattr(seen[1].recognizer.backend, "_session")


async def test_faults_model_changed_on_disk_after_its_checksum_is_refused_at_start(
    make_settings: Any, tmp_path: Path
) -> None:
    models = write_models(tmp_path)
    override = json.loads((models / "models.override.json").read_text())
    for name, entry in override.items():
        digest = hashlib.sha256((models / entry["file"]).read_bytes()).hexdigest()
        override[name]["checksum"] = f"sha256:{digest}"
    (models / "models.override.json").write_text(json.dumps(override))
    settings = make_settings(models_dir=models, trust_unverified=False)
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()  # the recorded checksums match: it starts
    await server.close()

    with (models / "rec.onnx").open("ab") as f:
        f.write(b"\0")  # changed after its checksum was recorded
    server = TestServer(create_app(settings), host="127.0.0.1")
    with pytest.raises(StartupError) as info:
        await server.start_server()
    await server.close()
    message = str(info.value)
    assert "checksum mismatch" in message and REC_MODEL in message
    assert str(models / "rec.onnx") in message
    assert DET_MODEL not in message


@pytest.mark.parametrize(
    ("encoding", "payload", "code"),
    [
        ("gzip", b"not gzip at all", "bad_request"),
        ("deflate", b"\x00\x01garbage", "bad_request"),
        ("gzip", b"\x1f\x8b\x08", "invalid_body"),  # a cut gzip header decodes to nothing
    ],
)
async def test_body_whose_content_encoding_does_not_decode_is_a_json_400(
    serve: Any, encoding: str, payload: bytes, code: str
) -> None:
    # Found by the hostile corpus: aiohttp's RequestPayloadError reached the 500 handler.
    client = await serve()
    resp = await client.post(
        "/extract",
        data=payload,
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == code


async def test_gzip_body_bomb_is_a_413(serve: Any) -> None:
    client = await serve(max_body_bytes=1_000_000)
    bomb = gzip.compress(b'{"images": {"data": ["' + b"A" * 50_000_000 + b'"]}}')
    assert len(bomb) < 100_000
    resp = await client.post(
        "/extract",
        data=bomb,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_body_that_trickles_past_body_timeout_gets_408_and_frees_the_socket(
    serve: Any,
) -> None:
    client = await serve(body_timeout_s=0.5)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"POST /extract HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    payload = await reader.readexactly(length)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"Connection: close" in head
    assert json.loads(payload)["error"]["code"] == "body_timeout"
