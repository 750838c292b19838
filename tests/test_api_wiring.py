"""Issue 15's API wiring: the executor from the thread budget, the decoder's nvJPEG status in
/info, one recognizer submission per request, /draw_detections without recognizer work, and the
reduced-scale JPEG decode on the REST path. A real server on 127.0.0.1 with real ONNX models."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from aiohttp import FormData

from appliance.api import state
from appliance.pipeline.nvjpeg import load as load_nvjpeg
from tests.conftest import PLANTED
from tests.helpers import b64, jpeg
from tests.real_data import real_settings
from tests.test_api import metric


async def test_executor_runs_as_many_jobs_at_once_as_the_thread_budget(serve: Any) -> None:
    # One more than the machine's cores: a pool sized to the cores (the old default) cannot
    # hold every party of the barrier at once and the barrier breaks.
    budget = (os.cpu_count() or 1) + 1
    client = await serve(cpu_threads=budget)
    executor = client.app[state.EXECUTOR]
    barrier = threading.Barrier(budget, timeout=10)
    loop = asyncio.get_running_loop()
    waits = [loop.run_in_executor(executor, barrier.wait) for _ in range(budget)]
    # Barrier.wait returns each party's distinct arrival index once all have arrived.
    assert sorted(await asyncio.gather(*waits)) == list(range(budget))


async def test_info_says_nvjpeg_is_unavailable_and_why_when_asked_for(serve: Any) -> None:
    if load_nvjpeg(True)[0] is not None:
        pytest.skip("nvImageCodec with a GPU is present on this host")
    client = await serve(use_nvjpeg=True)
    info = await (await client.get("/info")).json()
    assert info["nvjpeg"]["requested"] is True and info["nvjpeg"]["in_use"] is False
    assert info["nvjpeg"]["status"].startswith("not available: nvImageCodec is not installed")
    assert info["jpeg_decoder"] in ("turbojpeg", "opencv")
    # The field is declared, so clients see it in the schema.
    spec = await (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    assert "nvjpeg" in schemas["InfoResponse"]["required"]
    assert set(schemas["NvJpegInfo"]["properties"]) == {"requested", "in_use", "status"}


async def test_info_says_nvjpeg_is_off_by_default(serve: Any) -> None:
    client = await serve()
    info = await (await client.get("/info")).json()
    assert info["nvjpeg"] == {"requested": False, "in_use": False, "status": "off (USE_NVJPEG=0)"}


async def test_a_multi_image_request_sends_all_its_crops_to_the_recognizer_at_once(
    serve: Any,
) -> None:
    # Three images of three planted faces each: nine crops, within one recognizer batch (16).
    client = await serve(rec_batch_size=16)
    images = [b64(jpeg(1280, 960, seed=i)) for i in range(3)]
    resp = await client.post("/extract", json={"images": {"data": images}})
    assert resp.status == 200
    body = await resp.json()
    assert [len(d["faces"]) for d in body["data"]] == [3, 3, 3]
    assert all(len(f["vec"]) == 512 for d in body["data"] for f in d["faces"])
    text = await (await client.get("/metrics")).text()
    # One submission of nine items, not three of three (one per image).
    assert metric(text, "appliance_batch_submissions_total", model="recognizer") == 1
    assert metric(text, "appliance_batch_items_total", model="recognizer") == 9
    # The detector still gets one submission per image.
    assert metric(text, "appliance_batch_submissions_total", model="detector") == 3


async def test_a_bad_image_in_a_group_fails_alone_and_holds_no_pixels(serve: Any) -> None:
    client = await serve(rec_batch_size=16)
    images = [b64(jpeg(1280, 960)), b64(b"\xff\xd8\xff not a jpeg"), b64(jpeg(640, 480, seed=2))]
    resp = await client.post("/extract", json={"images": {"data": images}})
    assert resp.status == 200
    data = (await resp.json())["data"]
    assert [d["status"] for d in data] == ["ok", "error", "ok"]
    assert len(data[0]["faces"]) == 3 and len(data[2]["faces"]) == 3
    text = await (await client.get("/metrics")).text()
    assert metric(text, "appliance_batch_submissions_total", model="recognizer") == 1
    assert client.app[state.DECODER].budget.in_use == 0


def black_png(width: int = 1280, height: int = 960) -> bytes:
    ok, buf = cv2.imencode(".png", np.zeros((height, width, 3), np.uint8))
    assert ok
    return bytes(buf.tobytes())


def assert_drawn(jpeg_bytes: bytes) -> None:
    """The planted faces' boxes (green) and landmarks (red) on the black first image."""
    drawn = cv2.imdecode(np.frombuffer(jpeg_bytes, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == (960, 1280, 3)
    # 1280x960 letterboxes into 640x640 at 0.5: twice the detector-input coordinates. The
    # third planted face lies partly below the image (in the letterbox's padding).
    for face in PLANTED[:2]:
        x1, y1, x2, y2 = (round(v * 2) for v in face.bbox)
        assert drawn[(y1 + y2) // 2, x1 - 1 : x1 + 3, 1].max() > 150  # left edge is green
        assert drawn[(y1 + y2) // 2, x2 - 3 : x2 + 1, 1].max() > 150  # right edge is green
        for x, y in face.landmarks:
            assert drawn[round(y * 2), round(x * 2), 2] > 150  # a red landmark dot
    assert drawn[5, 640].max() < 40  # away from the faces it stays black


async def test_draw_detections_analyses_only_the_first_image_without_the_recognizer(
    serve: Any,
) -> None:
    client = await serve()
    others = [b64(jpeg(1280, 960, seed=i)) for i in range(3)]
    resp = await client.post(
        "/draw_detections",
        json={
            "images": {"data": [b64(black_png()), *others, b64(b"not an image")]},
            "extract_embedding": True,  # asked for, but a drawing shows no embedding
            "return_face_data": True,
        },
    )
    assert resp.status == 200 and resp.content_type == "image/jpeg"
    assert_drawn(await resp.read())
    form = FormData()
    form.add_field("images", black_png(), filename="a.png", content_type="image/png")
    form.add_field("images", jpeg(1280, 960), filename="b.jpg", content_type="image/jpeg")
    resp = await client.post("/multipart/draw_detections", data=form)
    assert resp.status == 200 and resp.content_type == "image/jpeg"
    assert_drawn(await resp.read())
    text = await (await client.get("/metrics")).text()
    # One detector submission per request (its first image), no recognizer work at all.
    assert metric(text, "appliance_batch_submissions_total", model="detector") == 2
    assert metric(text, "appliance_batch_submissions_total", model="recognizer") == 0
    assert metric(text, "appliance_backend_calls_total", model="recognizer") == 0
    assert client.app[state.DECODER].budget.in_use == 0


async def faces_of(client: Any, photo: bytes) -> list[dict[str, Any]]:
    body = {"images": {"data": [b64(photo)]}, "threshold": 0.5}
    resp = await client.post("/extract", json=body)
    assert resp.status == 200
    faces: list[dict[str, Any]] = (await resp.json())["data"][0]["faces"]
    return sorted(faces, key=lambda f: f["bbox"][0])


async def test_jpeg_dct_scaling_takes_effect_on_the_rest_path(
    serve: Any, real_models: Path, photos: Path
) -> None:
    # t1.jpg is 1280x886: exactly twice the 640x640 detector input, so with the setting on it
    # decodes at 1/2 scale (640x443), with it off (the default) in full.
    photo = (photos / "t1.jpg").read_bytes()
    full = await faces_of(await serve(**real_settings(real_models, rec_batch_size=1)), photo)
    reduced = await faces_of(
        await serve(**real_settings(real_models, rec_batch_size=1, jpeg_dct_scaling=True)), photo
    )
    assert len(full) == len(reduced) == 6
    for a, b in zip(full, reduced, strict=True):
        # Same faces, reported on the original image: boxes within a couple of pixels...
        assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 2
        similarity = float(np.dot(a["vec"], b["vec"]))
        assert similarity > 0.9
    # ...but not the same pixels: the crops came from the half-scale decode (measured: the
    # largest drift is about 0.05 in similarity, as docs/BENCHMARKS.md found; two full decodes
    # differ by rounding only, 1e-7).
    drift = max(1.0 - float(np.dot(a["vec"], b["vec"])) for a, b in zip(full, reduced, strict=True))
    print(f"dct scaling on the REST path: largest similarity drift {drift:.2e}")
    assert drift > 1e-4
    again = await faces_of(await serve(**real_settings(real_models, rec_batch_size=1)), photo)
    np.testing.assert_allclose([f["vec"] for f in again], [f["vec"] for f in full], atol=1e-6)


async def test_extract_decodes_and_letterboxes_an_image_in_one_executor_job(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await serve()
    executor = client.app[state.EXECUTOR]
    jobs: list[str] = []
    real_submit = executor.submit

    def counted(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        jobs.append(getattr(fn, "__name__", repr(fn)))
        return real_submit(fn, *args, **kwargs)

    monkeypatch.setattr(executor, "submit", counted)
    # A small body (a flat PNG): its parsing and base64 stay on the loop, by design.
    resp = await client.post("/extract", json={"images": {"data": [b64(black_png())]}})
    assert resp.status == 200
    assert len((await resp.json())["data"][0]["faces"]) == 3
    # Decode + letterbox, then SCRFD decoding + alignment: two hand-offs, not three.
    assert len(jobs) == 2, jobs


async def test_a_request_counts_as_an_analysis_from_before_its_decode(serve: Any) -> None:
    client = await serve(cpu_threads=2)
    # Both executor threads held: the request's decode cannot start until they are let go.
    release = threading.Event()
    loop = asyncio.get_running_loop()
    executor = client.app[state.EXECUTOR]
    held = [loop.run_in_executor(executor, release.wait, 10) for _ in range(2)]
    # Small enough that its body and base64 are parsed on the loop (OFFLOAD_BYTES).
    request = asyncio.create_task(
        client.post("/extract", json={"images": {"data": [b64(jpeg(320, 240))]}})
    )
    try:
        for _ in range(200):
            text = await (await client.get("/metrics")).text()
            if metric(text, "appliance_analyses_in_progress") == 1:
                break
            await asyncio.sleep(0.01)
        # Counted while it waits to be decoded, so another request's model run would take
        # one core, not both; no model run holds a core yet.
        assert metric(text, "appliance_analyses_in_progress") == 1
        assert metric(text, "appliance_model_cores_in_use") == 0
    finally:
        release.set()
        await asyncio.gather(*held)
    resp = await request
    assert resp.status == 200 and (await resp.json())["data"][0]["status"] == "ok"
    text = await (await client.get("/metrics")).text()
    assert metric(text, "appliance_analyses_in_progress") == 0
    assert metric(text, "appliance_model_cores_in_use") == 0
