"""What the responses say: InsightFace-REST's integer coordinates by default, sub-pixel floats
on request, and an honest `demo` flag when the generated demo models answer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import PLANTED
from tests.helpers import b64, jpeg

# 1000x750 letterboxes into 640x640 at scale 0.64: planted boxes land on fractional pixels.
SCALE = 0.64


async def test_coordinates_are_truncated_integers_unless_subpixel_is_asked(serve: Any) -> None:
    client = await serve()
    images = {"data": [b64(jpeg(1000, 750))]}
    common = {"images": images, "return_landmarks": True}
    ints = (await (await client.post("/extract", json=common)).json())["data"][0]["faces"]
    floats = (await (await client.post("/extract", json={**common, "subpixel": True})).json())[
        "data"
    ][0]["faces"]
    assert len(ints) == len(floats) == 3
    fractional = 0
    for i, f in zip(ints, floats, strict=True):
        assert all(type(v) is int for v in i["bbox"]) and type(i["size"]) is int
        assert all(type(v) is int for point in i["landmarks"] for v in point)
        # astype(int): truncation toward zero, as InsightFace-REST answers.
        assert i["bbox"] == [math.trunc(v) for v in f["bbox"]]
        assert i["landmarks"] == [[math.trunc(v) for v in p] for p in f["landmarks"]]
        # size is the box width, truncated.
        assert f["size"] == round(f["bbox"][2] - f["bbox"][0], 2)
        assert i["size"] == math.trunc(f["size"])
        fractional += sum(v != int(v) for v in f["bbox"])
    assert fractional >= 6  # the floats really carry the sub-pixel part
    expected = sorted(tuple(np.array(p.bbox) / SCALE) for p in PLANTED)
    got = sorted(tuple(f["bbox"]) for f in floats)
    assert np.abs(np.array(expected) - np.array(got)).max() < 0.02


async def test_demo_models_say_so_in_every_answer(serve: Any, tmp_path: Path) -> None:
    client = await serve(demo_models=True, models_dir=tmp_path)
    resp = await client.post("/extract", json={"images": {"data": [b64(jpeg(320, 240))]}})
    body = await resp.json()
    assert resp.status == 200
    assert body["demo"] is True
    assert any(w.startswith("demo models:") for w in body["warnings"])
    ready = await (await client.get("/health/ready")).json()
    assert ready["demo"] is True and ready["warnings"][0].startswith("demo models:")
    assert (await (await client.get("/info")).json())["demo"] is True


async def test_real_models_carry_no_demo_flag(serve: Any) -> None:
    client = await serve()
    body = await (
        await client.post("/extract", json={"images": {"data": [b64(jpeg(320, 240))]}})
    ).json()
    assert "demo" not in body and "warnings" not in body
    ready = await (await client.get("/health/ready")).json()
    assert "demo" not in ready
    assert (await (await client.get("/info")).json())["demo"] is False


async def test_large_answers_are_encoded_off_the_event_loop(
    serve: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    import threading

    from appliance.api import responses
    from appliance.models.demo import PlantedFace
    from tests.conftest import write_models

    # 20 faces: more than OFFLOAD_FACES in one answer.
    many = tuple(
        PlantedFace.square(40 + 120 * (i % 5), 40 + 140 * (i // 5), 48, score=0.9)
        for i in range(20)
    )
    models = write_models(tmp_path, many)
    threads: list[str] = []
    real = responses.encode_json

    def spy(value: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return real(value)

    monkeypatch.setattr(responses, "encode_json", spy)
    client = await serve(models_dir=models)
    images = {"data": [b64(jpeg(640, 640))]}
    big = await (await client.post("/extract", json={"images": images})).json()
    assert len(big["data"][0]["faces"]) == 20 > responses.OFFLOAD_FACES
    small = await client.post("/extract", json={"images": images, "limit_faces": 3})
    assert len((await small.json())["data"][0]["faces"]) == 3
    loop_thread = threading.current_thread().name  # the test and the server share the loop
    assert threads[0] != loop_thread and threads[0].startswith("cpu")
    assert threads[1] == loop_thread
