"""`/ws/stream` end to end: a real server on 127.0.0.1, real ONNX models, aiohttp's client."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from appliance.api import state
from appliance.api.policy import LoadPolicy
from appliance.api.state import STREAMS
from appliance.api.stream_protocol import BadConfig, parse_config
from tests import stream_fixtures
from tests.conftest import PLANTED
from tests.helpers import b64, jpeg, png
from tests.stream_fixtures import (
    close_message,
    eventually,
    metric,
    receive_json,
    receive_until,
    small_receive_buffer,
    wait_closed,
)

# pytest finds fixtures by the name in the test module; tests/conftest.py is the lead's.
slow_models_dir = stream_fixtures.slow_models_dir
FRAME = jpeg(640, 480)


def is_type(kind: str) -> Any:
    return lambda m: m["type"] == kind


async def test_results_carry_tagged_seq_and_ts_in_order(serve: Any) -> None:
    client = await serve()
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_json({"type": "config", "return_landmarks": True, "max_fps": 30})
        ack, _ = await receive_until(ws, is_type("config"))
        assert ack["max_fps"] == 30
        for seq in (7, 8, 42):
            await ws.send_json({"type": "frame", "seq": seq, "ts": seq * 1.5})
            await ws.send_bytes(FRAME)
            result, _ = await receive_until(ws, is_type("result"))
            assert (result["seq"], result["ts"]) == (seq, seq * 1.5)
            assert result["took_ms"] > 0
            # 640x480 is letterboxed at scale 1: boxes come back at their planted pixels.
            got = sorted(tuple(f["bbox"]) for f in result["faces"])
            assert got == sorted(tuple(round(v) for v in p.bbox) for p in PLANTED)
            assert all(len(f["landmarks"]) == 5 and len(f["vec"]) == 512 for f in result["faces"])
        # Untagged frames are numbered on from the last seq; PNG is accepted too.
        await ws.send_bytes(png(320, 240))
        result, _ = await receive_until(ws, is_type("result"))
        assert (result["seq"], result["ts"]) == (43, None)
        assert len(result["faces"]) == 3


async def test_embeddings_off_and_threshold_from_config(serve: Any) -> None:
    client = await serve()
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_json({"type": "config", "extract_embedding": False, "threshold": 0.9})
        await ws.send_bytes(FRAME)
        result, _ = await receive_until(ws, is_type("result"))
        assert [f["prob"] for f in result["faces"]] == [pytest.approx(0.95)]
        assert result["faces"][0]["vec"] is None


async def test_burst_faster_than_model_drops_frames_without_backlog(
    serve: Any, slow_models_dir: Path
) -> None:
    client = await serve(
        models_dir=slow_models_dir, stream_max_fps=1000.0, stream_stats_interval_s=0.2
    )
    app = client.server.app
    batcher = app[state.ANALYZER].detector.batcher
    peak = {"depth": 0, "waiting": 0, "outbox": 0}
    sampling = True

    async def sample() -> None:
        # In-process probe of the bounded structures while the burst runs.
        while sampling:
            peak["depth"] = max(peak["depth"], batcher.depth)
            for s in app[STREAMS].streams.values():
                peak["waiting"] = max(peak["waiting"], int(s.waiting is not None))
                peak["outbox"] = max(peak["outbox"], len(s.outbox))
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    frames = 120
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_json({"type": "config", "max_fps": 1000, "extract_embedding": False})
        start = time.perf_counter()
        for seq in range(1, frames + 1):
            await ws.send_json({"type": "frame", "seq": seq, "ts": seq})
            await ws.send_bytes(FRAME)
        sent_s = time.perf_counter() - start
        # Latest frame wins: the last frame sent is always processed.
        last, seen = await receive_until(ws, lambda m: m["type"] == "result" and m["seq"] == frames)
        results = [m["seq"] for m in seen if m["type"] == "result"] + [last["seq"]]
        stats_msg = None
        while stats_msg is None or stats_msg["received"] < frames:
            stats_msg, _ = await receive_until(ws, is_type("stats"))
    sampling = False
    await sampler
    assert results == sorted(results) and len(set(results)) == len(results)
    assert stats_msg["received"] == frames
    assert stats_msg["processed"] == len(results) < frames / 2
    assert stats_msg["dropped"] == stats_msg["dropped_replaced"] == frames - len(results)
    assert stats_msg["dropped_over_fps"] == 0
    assert stats_msg["latency_ms"]["p50"] > 0
    # The sender was never slowed down by the model...
    assert sent_s < frames * 0.045 / 2
    # ...and nothing queued up: one frame in flight, one waiting.
    assert peak["depth"] <= 1
    assert peak["waiting"] == 1
    assert peak["outbox"] <= app[state.SETTINGS].stream_send_queue


async def test_memory_stays_flat_under_sustained_burst(serve: Any, slow_models_dir: Path) -> None:
    import tracemalloc

    client = await serve(models_dir=slow_models_dir, stream_max_fps=1000.0)
    big = jpeg(1280, 960, seed=3)  # ~3.7 MB/frame of raw bytes: a backlog would show at once
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_json({"type": "config", "max_fps": 1000, "extract_embedding": False})
        tracemalloc.start()
        try:
            peaks = []
            for round_ in range(3):
                tracemalloc.reset_peak()
                for _ in range(40):
                    await ws.send_bytes(big)
                await receive_until(ws, is_type("result"))
                peaks.append(tracemalloc.get_traced_memory()[1])
                del round_
        finally:
            tracemalloc.stop()
    # 40 frames of 1280x960 queued would be > 100 MB of decoded pixels; the peak stays at a
    # few frames' worth and does not grow from round to round.
    assert max(peaks) < 60e6
    assert peaks[2] < peaks[0] * 1.5 + 5e6


async def test_non_reading_client_does_not_slow_a_second_stream(serve: Any) -> None:
    client = await serve(stream_send_queue=2, stream_max_fps=1000.0)
    app = client.server.app
    host, port = client.server.host, client.server.port
    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    async with (
        aiohttp.ClientSession(connector=connector) as lazy_session,
        lazy_session.ws_connect(f"http://{host}:{port}/ws/stream") as lazy,
    ):
        # Big results (embeddings and face crops) fill the lazy client's socket quickly.
        await lazy.send_json({"type": "config", "max_fps": 1000, "return_face_data": True})
        lazy_stream = next(s for s in app[STREAMS].streams.values())
        # A slow network, simulated on the server's side too: without this the kernel
        # autotunes the send buffer to megabytes and the stall takes long to show.
        server_socket = lazy_stream.ws._req.transport.get_extra_info("socket")
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        async def flood() -> None:
            while True:
                await lazy.send_bytes(FRAME)
                await asyncio.sleep(0.002)

        flooder = asyncio.create_task(flood())
        try:
            await eventually(lambda: lazy_stream.counters.results_dropped >= 5, timeout=20)
            # The lazy stream is wedged on its socket; the other stream still gets answers
            # promptly, one round trip after another. (It connects only now: an idle client
            # answers no heartbeat pings, and on a loaded machine the wait above can outlast
            # STREAM_HEARTBEAT_S.)
            round_trips = []
            async with client.ws_connect("/ws/stream") as ws:
                for seq in range(1, 21):
                    t0 = time.perf_counter()
                    await ws.send_json({"type": "frame", "seq": seq, "ts": None})
                    await ws.send_bytes(FRAME)
                    result, _ = await receive_until(ws, is_type("result"), timeout=5)
                    assert result["seq"] == seq
                    round_trips.append(time.perf_counter() - t0)
            # A stream stalled behind the lazy client's socket would time out (5 s); sharing
            # two CPU cores with the lazy client's flood costs a few hundred ms at most.
            assert float(np.median(round_trips)) < 1.0
            assert max(round_trips) < 2.0
            assert lazy_stream.counters.processed > 20
            assert len(lazy_stream.outbox) <= 2
        finally:
            flooder.cancel()
            await asyncio.gather(flooder, return_exceptions=True)


async def test_frame_over_max_frame_bytes_closes_with_1009(serve: Any) -> None:
    client = await serve(max_frame_bytes=50_000)
    async with client.ws_connect("/ws/stream") as ws:
        small, big = jpeg(96, 96), jpeg(640, 480, seed=1)
        assert len(small) < 50_000 < len(big)
        await ws.send_bytes(small)
        await receive_until(ws, is_type("result"))
        await ws.send_bytes(big)
        assert await wait_closed(ws) == 1009
    await eventually(lambda: not client.server.app[STREAMS].streams)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "appliance_streams_closed_total", code="1009") == 1


# The truncated JPEG below makes libjpeg-turbo warn before it fails: expected here.
@pytest.mark.filterwarnings("ignore:Invalid JPEG file structure")
async def test_garbage_frames_beyond_the_limit_close_with_1008(serve: Any) -> None:
    client = await serve(stream_max_bad_frames=3)
    async with client.ws_connect("/ws/stream") as ws:
        errors = []
        for i in range(3):
            await ws.send_bytes(b"not an image %d" % i)
            message, _ = await receive_until(ws, is_type("error"))
            errors.append(message)
        assert [e["seq"] for e in errors] == [1, 2, 3]
        # A truncated JPEG passes the magic check and fails in the decoder: still bad.
        await ws.send_bytes(FRAME[:200])
        assert await wait_closed(ws) == 1008
    await eventually(lambda: not client.server.app[STREAMS].streams)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "appliance_stream_frames_total", outcome="bad") == 4
    assert metric(text, "appliance_streams_closed_total", code="1008") == 1


@pytest.mark.parametrize(
    "config",
    [
        {"type": "config", "max_fps": -1},
        {"type": "config", "threshold": 7},
        {"type": "config", "max_size": "big"},
    ],
)
async def test_bad_config_closes_with_1008(serve: Any, config: dict[str, Any]) -> None:
    client = await serve()
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_json(config)
        _, reason = await close_message(ws)
        assert ws.close_code == 1008
        assert reason.startswith("bad config: ")


def test_parse_config_clamps_max_fps_and_reports_unknown_fields() -> None:
    config = parse_config({"type": "config", "max_fps": 90, "colour": "red"}, 0.6, (640, 640), 30)
    assert config.max_fps == 30
    assert config.options.source == "stream"
    assert config.warnings == (
        "max_fps 90 is above STREAM_MAX_FPS; using 30",
        "unknown field 'colour' ignored",
    )
    with pytest.raises(BadConfig, match="max_fps"):
        parse_config({"max_fps": "fast"}, 0.6, (640, 640), 30)


async def test_stream_beyond_max_streams_is_closed_with_1013(serve: Any) -> None:
    client = await serve(max_streams=2)
    async with client.ws_connect("/ws/stream") as a, client.ws_connect("/ws/stream") as b:
        for ws in (a, b):
            await receive_until(ws, is_type("status"))
        async with client.ws_connect("/ws/stream") as c:
            msg = await c.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert c.close_code == 1013
            assert "MAX_STREAMS is 2" in msg.extra
        # The two admitted streams still work.
        await a.send_bytes(FRAME)
        result, _ = await receive_until(a, is_type("result"))
        assert result["seq"] == 1


async def test_server_shutdown_closes_streams_with_1001(serve: Any) -> None:
    client = await serve()
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_bytes(FRAME)
        await receive_until(ws, is_type("result"))
        closing = asyncio.create_task(client.server.close())
        assert await wait_closed(ws) == 1001
        await closing


async def test_streams_and_rest_share_the_same_batches(serve: Any) -> None:
    # A wide window and a batch of 4 make a REST image and a stream frame that arrive
    # together land in one detector batch.
    client = await serve(batch_window_ms=100, det_batch_size=4)
    body = {"images": {"data": [b64(FRAME)]}, "extract_embedding": False}
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_json({"type": "config", "extract_embedding": False})
        for seq in range(1, 6):
            await ws.send_bytes(FRAME)
            resp, (result, _) = await asyncio.gather(
                client.post("/extract", json=body), receive_until(ws, is_type("result"))
            )
            assert resp.status == 200 and result["seq"] == seq
            text = await (await client.get("/metrics")).text()
            if metric(text, "appliance_mixed_batches_total", model="detector") > 0:
                break
    assert metric(text, "appliance_mixed_batches_total", model="detector") > 0
    assert metric(text, "appliance_batch_items_total", model="detector", source="stream") == seq
    assert metric(text, "appliance_batch_items_total", model="detector", source="rest") == seq


async def test_governor_warm_pushes_halved_fps_and_critical_closes_with_1013(serve: Any) -> None:
    client = await serve(stream_max_fps=20.0)
    board = client.server.app[state.POLICY]
    async with client.ws_connect("/ws/stream") as ws:
        status, _ = await receive_until(ws, is_type("status"))
        assert (status["state"], status["max_fps"]) == ("ok", 20)
        board.publish(LoadPolicy(state="warm", fps_factor=0.5, reason="thermal 81 C"))
        status, _ = await receive_until(ws, is_type("status"))
        assert (status["state"], status["max_fps"]) == ("warm", 10)
        board.publish(LoadPolicy(state="hot", fps_factor=0.25, accept_new_streams=False))
        status, _ = await receive_until(ws, is_type("status"))
        assert (status["state"], status["max_fps"], status["accept_new_streams"]) == (
            "hot",
            5,
            False,
        )
        # While hot, a new stream is refused; the open one keeps working.
        async with client.ws_connect("/ws/stream") as refused:
            assert await wait_closed(refused) == 1013
        await ws.send_bytes(FRAME)
        await receive_until(ws, is_type("result"))
        board.publish(LoadPolicy(state="critical", fps_factor=0.0, inference_paused=True))
        assert await wait_closed(ws) == 1013
    assert client.server.app[STREAMS].streams == {}


async def test_fps_cap_drops_frames_that_arrive_too_fast(serve: Any) -> None:
    client = await serve(stream_stats_interval_s=0.2)
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_json({"type": "config", "max_fps": 2, "extract_embedding": False})
        await receive_until(ws, is_type("config"))
        t_sent = time.perf_counter()
        for seq in range(1, 21):
            await ws.send_json({"type": "frame", "seq": seq, "ts": None})
            await ws.send_bytes(FRAME)
        first, _ = await receive_until(ws, is_type("result"))
        second, _ = await receive_until(ws, is_type("result"))
        # Measured from the first send, which precedes the first frame's start: how long the
        # first result itself took (a loaded machine) cannot shrink this interval.
        gap = time.perf_counter() - t_sent
        stats = None
        while stats is None or stats["received"] < 20:
            stats, _ = await receive_until(ws, is_type("stats"))
    # The first frame starts at once, the next no sooner than 1/2 s later, and it is the
    # newest one: everything in between was dropped.
    assert (first["seq"], second["seq"]) == (1, 20)
    assert gap >= 0.5
    assert (stats["processed"], stats["dropped"]) == (2, 18)


async def test_stream_needs_the_token_when_auth_is_on(serve: Any) -> None:
    client = await serve(api_token="s3cret")
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await client.ws_connect("/ws/stream")
    assert exc.value.status == 401
    async with client.ws_connect("/ws/stream?token=s3cret") as ws:
        await ws.send_bytes(FRAME)
        result, _ = await receive_until(ws, is_type("result"))
        assert len(result["faces"]) == 3
    headers = {"Authorization": "Bearer s3cret"}
    async with client.ws_connect("/ws/stream", headers=headers) as ws:
        assert (await receive_json(ws))["type"] == "status"


async def test_heartbeat_closes_a_peer_that_stops_answering_pings(serve: Any) -> None:
    client = await serve(stream_heartbeat_s=0.2)
    registry = client.server.app[STREAMS]
    # autoping=False: this client never answers the server's pings, like a vanished peer.
    async with client.ws_connect("/ws/stream", autoping=False) as ws:
        await eventually(lambda: len(registry.streams) == 1)
        await eventually(lambda: not registry.streams, timeout=5)
        assert ws is not None
    text = await (await client.get("/metrics")).text()
    assert metric(text, "appliance_streams_closed_total") == 1
    assert metric(text, "appliance_streams_active") == 0
