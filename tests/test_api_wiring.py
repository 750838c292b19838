"""Issue 15's API wiring: the executor from the thread budget, the decoder's nvJPEG status in
/info, one recognizer submission per request, /draw_detections without recognizer work, and the
reduced-scale JPEG decode on the REST path. A real server on 127.0.0.1 with real ONNX models."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

from appliance.api import state
from appliance.pipeline.nvjpeg import load as load_nvjpeg
from tests.helpers import b64, jpeg
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
