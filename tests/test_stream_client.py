"""`StreamClient` and `appliance stream` against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import pytest

from appliance.api import state
from appliance.api.policy import LoadPolicy
from appliance.client import StreamClient, StreamClosed
from tests.helpers import image, jpeg

FRAME = jpeg(640, 480)


def ws_url(client: Any, path: str = "/ws/stream") -> str:
    return f"ws://{client.server.host}:{client.server.port}{path}"


async def test_client_gets_results_in_order_with_latency(serve: Any) -> None:
    server = await serve()
    async with StreamClient(ws_url(server), config={"extract_embedding": False}) as c:
        for expected in (1, 2, 3):
            seq = await c.send_frame(FRAME)
            assert seq == expected
            result = await c.next_result(timeout=10)
            assert result.seq == expected
            assert len(result.faces) == 3
            assert all(f["vec"] is None for f in result.faces)
            assert result.latency_ms is not None and result.latency_ms >= result.took_ms > 0
        assert (c.stats.sent, c.stats.results) == (3, 3)
        assert c.stats.latency_percentile(50) is not None


async def test_client_run_paces_frames_and_reports_drops(serve: Any) -> None:
    server = await serve(stream_stats_interval_s=0.2)

    async def frames(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield FRAME

    async with StreamClient(ws_url(server), config={"max_fps": 5}) as c:
        stats = await c.run(frames(12), fps=40)
    d = stats.as_dict()
    assert d["sent"] == 12
    # 12 frames at 40 fps take ~0.3 s; the server's cap of 5 fps starts one frame per 0.2 s
    # (3 in all: the first, the newest at 0.2 s and the last one), whatever was sent between.
    assert 2 <= d["results"] <= 5
    assert d["dropped"] == 12 - d["results"]
    assert d["sent_fps"] <= 45
    assert d["state"] == "ok"
    assert "dropped" in stats.summary()


async def test_client_uses_the_token_and_surfaces_close_codes(serve: Any) -> None:
    server = await serve(api_token="tok")
    async with StreamClient(ws_url(server), token="tok") as c:
        await c.send_frame(FRAME)
        assert len((await c.next_result(timeout=10)).faces) == 3
        server.server.app[state.POLICY].publish(
            LoadPolicy(state="critical", fps_factor=0.0, inference_paused=True)
        )
        with pytest.raises(StreamClosed) as exc:
            await c.next_result(timeout=10)
        assert exc.value.code == 1013
        assert "critical" in exc.value.reason


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"frame{i:02d}.jpg"), image(640, 480, seed=i))
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "appliance.cli",
        "stream",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_streams_an_image_directory_as_json_lines(serve: Any, image_dir: Path) -> None:
    server = await serve()
    code, out, err = await run_cli(
        ws_url(server), str(image_dir), "--fps", "5", "--json", "--no-embeddings"
    )
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    # Results come in order, the newest frame always wins (a loaded machine may replace a
    # frame that waited behind a slow one, never the last), and every frame is accounted for.
    seqs = [r["seq"] for r in results]
    assert seqs == sorted(seqs) and set(seqs) <= {1, 2, 3, 4, 5}
    assert seqs[0] == 1 and seqs[-1] == 5 and len(seqs) >= 3
    assert all(len(r["faces"]) == 3 and r["faces"][0]["vec"] is None for r in results)
    report = json.loads(err[err.index("{") :])
    assert report["sent"] == 5
    assert report["results"] == len(seqs)
    assert report["results"] + report["dropped"] == 5
    assert "latency p50/p99" in err


async def test_cli_streams_a_video_file_with_a_frame_limit(serve: Any, tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    fourcc = cv2.VideoWriter_fourcc(*"MJPG")  # type: ignore[attr-defined]
    writer = cv2.VideoWriter(str(video), fourcc, 25, (320, 240))
    assert writer.isOpened()
    for i in range(30):
        writer.write(image(320, 240, seed=i))
    writer.release()
    server = await serve()
    code, out, _ = await run_cli(ws_url(server), str(video), "--fps", "10", "--frames", "8")
    assert code == 0
    report = json.loads(out)
    assert report["sent"] == 8
    assert report["results"] + report["dropped"] == 8
    assert report["results"] >= 1


async def test_cli_explains_a_missing_source_and_a_refused_token(serve: Any) -> None:
    server = await serve(api_token="tok")
    code, _, err = await run_cli(ws_url(server), "/nonexistent/clip.mp4")
    assert code == 2 and "no such file" in err
    code, _, err = await run_cli(ws_url(server), "0", "--token", "wrong")
    assert code == 2 and "refused the stream: 401" in err
