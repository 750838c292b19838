"""Many streams share a constant number of frame slots: the detector queue does not grow with
the number of streams, each stream still gets its newest frame analysed, and streams take turns.
A real server on 127.0.0.1, real (generated) ONNX models, aiohttp's client."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.api import state
from appliance.api.state import STREAMS
from appliance.config import ConfigError, load_settings
from tests import stream_fixtures
from tests.helpers import jpeg
from tests.stream_fixtures import metric, receive_until

slow_models_dir = stream_fixtures.slow_models_dir
FRAME = jpeg(640, 480)
STREAMS_OPEN = 8
BURST_S = 2.0


async def burst_then_last(ws: aiohttp.ClientWebSocketResponse, last_seq: int) -> dict[str, Any]:
    """Send frames back to back for BURST_S, then a tagged last one; its result."""
    seq = 0
    deadline = time.monotonic() + BURST_S
    while time.monotonic() < deadline:
        seq += 1
        await ws.send_json({"type": "frame", "seq": seq, "ts": None})
        await ws.send_bytes(FRAME)
        await asyncio.sleep(0.02)
    await ws.send_json({"type": "frame", "seq": last_seq, "ts": None})
    await ws.send_bytes(FRAME)
    result, _ = await receive_until(
        ws, lambda m: m["type"] == "result" and m["seq"] == last_seq, timeout=60
    )
    return result


async def test_many_streams_share_a_few_frame_slots_and_all_get_their_newest_frame(
    serve: Any, slow_models_dir: Path
) -> None:
    # One detector worker with batch 1: 2 x 1 x 1 + 1 = 3 slots for 8 streams.
    client = await serve(
        models_dir=slow_models_dir, det_batch_size=1, det_workers=1, stream_max_fps=1000.0
    )
    app = client.server.app
    slots = app[STREAMS].slots
    assert slots is not None and slots.size == 3
    batcher = app[state.ANALYZER].detector.batcher
    peak = {"depth": 0, "in_use": 0}
    sampling = True

    async def sample() -> None:
        while sampling:
            peak["depth"] = max(peak["depth"], batcher.depth)
            peak["in_use"] = max(peak["in_use"], slots.in_use)
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    sockets = [await client.ws_connect("/ws/stream") for _ in range(STREAMS_OPEN)]
    try:
        for ws in sockets:
            await ws.send_json({"type": "config", "max_fps": 1000, "extract_embedding": False})
        last = await asyncio.gather(*(burst_then_last(ws, 10_000) for ws in sockets))
        text = await (await client.get("/metrics")).text()
        per_stream = [s.counters.processed for s in app[STREAMS].streams.values()]
    finally:
        sampling = False
        await sampler
        for ws in sockets:
            await ws.close()
    # Latest frame wins for every stream, whatever the others do.
    assert [r["seq"] for r in last] == [10_000] * STREAMS_OPEN
    # Without the slots every stream keeps a frame queued: the depth would reach ~8.
    assert peak["depth"] <= slots.size < STREAMS_OPEN
    assert peak["in_use"] == slots.size
    processed = metric(text, "appliance_stream_frames_total", outcome="processed")
    replaced = metric(text, "appliance_stream_frames_total", outcome="replaced")
    # Frames were analysed during the burst, not only the last ones, and the slots went
    # round the streams (first come, first served) instead of to whichever asked again first.
    assert len(per_stream) == STREAMS_OPEN and sum(per_stream) > STREAMS_OPEN
    assert max(per_stream) - min(per_stream) <= 2
    assert processed == sum(per_stream) and replaced > 0
    assert metric(text, "appliance_stream_frame_slots") == slots.size


async def test_stream_frame_slots_setting_overrides_the_detectors_count(serve: Any) -> None:
    client = await serve(stream_frame_slots=7, det_workers=1, det_batch_size=1)
    slots = client.server.app[STREAMS].slots
    assert slots is not None and slots.size == 7  # not the 3 one worker at batch 1 gives
    text = await (await client.get("/metrics")).text()
    assert metric(text, "appliance_stream_frame_slots") == 7


@pytest.mark.parametrize("value", ["-1", "1025"])
def test_stream_frame_slots_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"STREAM_FRAME_SLOTS must be within 0\.\.1024"):
        load_settings(env={"STREAM_FRAME_SLOTS": value})
