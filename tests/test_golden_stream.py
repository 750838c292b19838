"""Real video through the stream client: the shared Hamilton clip, the real models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import pytest

from appliance.client import StreamClient
from tests.real_data import REAL_DETECTOR, REAL_RECOGNIZER

CLIP = "short_hamilton_clip.mp4"
EVERY = 5  # every 5th of the 275 frames: 55 frames, enough to judge "most"


def clip_frames(photos: Path, every: int = EVERY) -> list[bytes]:
    path = photos / CLIP
    if not path.is_file():
        pytest.skip(f"{path} not found (shared test data)")
    capture = cv2.VideoCapture(str(path))
    frames = []
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if index % every == 0:
                ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
                assert ok
                frames.append(bytes(jpeg.tobytes()))
            index += 1
    finally:
        capture.release()
    assert index == 275, f"decoded {index} frames of {CLIP}"
    return frames


def ws_url(client: Any) -> str:
    return f"ws://{client.server.host}:{client.server.port}/ws/stream"


async def real_server(serve: Any, real_models: Path) -> Any:
    return await serve(
        models_dir=real_models,
        det_model=REAL_DETECTOR,
        rec_model=REAL_RECOGNIZER,
        trust_unverified=False,
        det_batch_size=1,
        rec_batch_size=4,
    )


async def test_faces_are_found_in_most_frames_of_a_real_clip_in_order(
    serve: Any, real_models: Path, photos: Path
) -> None:
    frames = clip_frames(photos)
    server = await real_server(serve, real_models)
    with_faces = 0
    async with StreamClient(ws_url(server), config={"threshold": 0.5}) as client:
        for frame in frames:
            seq = await client.send_frame(frame)
            result = await client.next_result(timeout=30)
            assert result.seq == seq
            if result.faces:
                with_faces += 1
                for face in result.faces:
                    x1, y1, x2, y2 = face["bbox"]
                    # Boxes are not clipped (nor are the reference's): a face cut by the
                    # frame's edge reaches past it, but every box overlaps the 640x360 frame.
                    assert x1 < x2 and y1 < y2 and x1 < 640 and y1 < 360 and x2 > 0 and y2 > 0
                    assert len(face["vec"]) == 128
    assert with_faces >= 0.8 * len(frames), f"faces in {with_faces} of {len(frames)} frames"


async def test_frames_sent_ahead_come_back_in_order(
    serve: Any, real_models: Path, photos: Path
) -> None:
    frames = clip_frames(photos)[:20]
    server = await real_server(serve, real_models)

    async def source() -> AsyncIterator[bytes]:
        for frame in frames:
            yield frame

    seqs: list[int] = []
    async with StreamClient(ws_url(server), config={"threshold": 0.5}) as client:
        client.on_message(lambda m: seqs.append(m["seq"]) if m.get("type") == "result" else None)
        stats = await client.run(source(), fps=30, drain_timeout=30)
    # The server may drop frames it cannot keep up with (latest wins), never reorder them.
    assert stats.results >= 1
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert set(seqs) <= set(range(1, len(frames) + 1))
