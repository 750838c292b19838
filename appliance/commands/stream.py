"""`appliance stream URL SOURCE`: stream a video file, an image directory or a camera.

Frames are read and JPEG-encoded in a worker thread, sent at `--fps` by `StreamClient`, and
the server's answers are shown as a live summary line (stderr) and, with `--json`, as JSON
lines on stdout. A final report follows when the source ends or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# Longest side of a sent frame: the detector works at 640 anyway, bigger only costs bandwidth.
DEFAULT_MAX_SIDE = 1280


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "stream", help="stream a video, an image directory or a camera to /ws/stream"
    )
    p.add_argument("url", help="WebSocket URL, e.g. ws://127.0.0.1:18080/ws/stream")
    p.add_argument("source", help="video file, directory of images, or camera index (0, 1, ...)")
    p.add_argument("--fps", type=float, default=10.0, help="frames sent per second (10)")
    p.add_argument(
        "--max-fps", type=float, help="server-side cap sent in the config (default: --fps)"
    )
    p.add_argument(
        "--embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for 512-d embeddings (--no-embeddings: boxes and scores only)",
    )
    p.add_argument("--threshold", type=float, help="detection threshold (server default)")
    p.add_argument("--landmarks", action="store_true", help="ask for the five landmarks")
    p.add_argument("--json", action="store_true", help="print every result as a JSON line")
    p.add_argument("--token", help="API token (API_TOKEN of the appliance)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--frames", type=int, help="stop after this many frames")
    p.add_argument("--loop", action="store_true", help="restart a file or directory at its end")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="resize larger frames")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality (85)")
    p.set_defaults(handler=run)


def check_source(source: str) -> None:
    """Fail before connecting when the source cannot exist (a camera is only known on open)."""
    if not source.isdigit() and not Path(source).exists():
        raise ValueError(f"{source}: no such file, directory or camera index")


def read_frames(source: str, loop: bool, max_side: int, quality: int) -> Iterator[bytes]:
    """JPEG frames from a camera index, a video file or a directory of images (blocking)."""
    import cv2

    def encode(img: Any) -> bytes:
        h, w = img.shape[:2]
        if max(h, w) > max_side:
            k = max_side / max(h, w)
            img = cv2.resize(img, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError("cannot JPEG-encode a frame")
        return bytes(buf.tobytes())

    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        while True:
            for file in files:
                img = cv2.imread(str(file), cv2.IMREAD_COLOR)
                if img is not None:
                    yield encode(img)
            if not loop:
                return
    camera = source.isdigit()
    check_source(source)
    while True:
        cap = cv2.VideoCapture(int(source) if camera else str(path))
        if not cap.isOpened():
            raise ValueError(f"{source}: OpenCV cannot open it")
        try:
            while True:
                ok, img = cap.read()
                if not ok:
                    break
                yield encode(img)
        finally:
            cap.release()
        if camera or not loop:
            return


async def frames_async(frames: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Pull each frame in a thread: decoding video and JPEG encoding must not block the loop."""
    done = object()
    while True:
        frame = await asyncio.to_thread(next, frames, done)
        if frame is done:
            return
        assert isinstance(frame, bytes)
        yield frame


async def limited(
    frames: AsyncIterator[bytes], count: int | None, duration: float | None
) -> AsyncIterator[bytes]:
    start = time.perf_counter()
    n = 0
    async for frame in frames:
        if count is not None and n >= count:
            return
        if duration is not None and time.perf_counter() - start >= duration:
            return
        n += 1
        yield frame


async def stream(args: argparse.Namespace) -> int:
    from appliance.client import StreamClient, StreamClosed

    config: dict[str, Any] = {
        "max_fps": args.max_fps or args.fps,
        "extract_embedding": args.embeddings,
        "return_landmarks": args.landmarks,
    }
    if args.threshold is not None:
        config["threshold"] = args.threshold
    check_source(args.source)
    frames = read_frames(args.source, args.loop, args.max_side, args.quality)
    client = StreamClient(args.url, token=args.token, config=config)

    def show(message: dict[str, Any]) -> None:
        if args.json and message.get("type") == "result":
            print(json.dumps(message, separators=(",", ":")), flush=True)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1.0)
            print("\r" + client.stats.summary(), end="", file=sys.stderr, flush=True)

    client.on_message(show)
    code = 0
    async with client:
        tick = asyncio.create_task(ticker())
        try:
            await client.run(limited(frames_async(frames), args.frames, args.duration), args.fps)
        except StreamClosed as exc:
            print(f"\nappliance stream: {exc}", file=sys.stderr)
            code = 1
        finally:
            tick.cancel()
            await asyncio.gather(tick, return_exceptions=True)
    report = json.dumps(client.stats.as_dict(), indent=2)
    print(f"\r{client.stats.summary()}", file=sys.stderr)
    print(report, file=sys.stderr if args.json else sys.stdout)
    return code


def run(args: argparse.Namespace) -> int:
    import aiohttp

    try:
        return asyncio.run(stream(args))
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"appliance stream: {exc}", file=sys.stderr)
        return 2
    except aiohttp.WSServerHandshakeError as exc:
        print(
            f"appliance stream: the server refused the stream: {exc.status} {exc.message}",
            file=sys.stderr,
        )
        return 2
    except (OSError, aiohttp.ClientError) as exc:
        print(f"appliance stream: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
