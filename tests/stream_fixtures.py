"""Fixtures and helpers for the stream tests (tests/conftest.py belongs to the lead)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import PLANTED, write_models

# ~45 ms per 640x640 image on this 2-core machine (the default test detector takes ~4 ms):
# slow enough that a sender without pauses outruns it.
SLOW_TRUNK = {"trunk_layers": 6, "trunk_channels": 48}
WAIT_S = 10.0


@pytest.fixture(scope="session")
def slow_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("slow_models"), PLANTED, **SLOW_TRUNK)


async def receive_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = WAIT_S) -> Any:
    """The next text message as JSON; fails the test on close or timeout."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text message, got {msg}"
    return json.loads(msg.data)


async def receive_until(
    ws: aiohttp.ClientWebSocketResponse,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = WAIT_S,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read messages until one matches; returns it and every message read before it."""
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] = []
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no matching message within {timeout} s; saw {seen[-5:]}"
        message = await receive_json(ws, remaining)
        if predicate(message):
            return message, seen
        seen.append(message)


async def wait_closed(ws: aiohttp.ClientWebSocketResponse, timeout: float = WAIT_S) -> int | None:
    """Read (and discard) until the server closes; returns the close code."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the server did not close the stream"
        msg = await ws.receive(timeout=remaining)
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
        ):
            return ws.close_code
        if msg.type == aiohttp.WSMsgType.ERROR:
            return ws.close_code


async def close_message(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = WAIT_S
) -> tuple[int | None, str]:
    """Read until the server's close frame; returns its code and reason."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the server did not close the stream"
        msg = await ws.receive(timeout=remaining)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return ws.close_code, str(msg.extra or "")
        assert msg.type == aiohttp.WSMsgType.TEXT, f"unexpected {msg}"


async def eventually(check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Poll a cheap in-process condition (no event exists for it) until true."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def metric(text: str, name: str, **labels: str) -> float:
    label_re = "".join(f'(?=[^}}]*{k}="{v}")' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{{label_re}[^}}]*\}})? ([0-9.e+-]+)$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


def small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket with a tiny receive window, so a client that stops reading is felt by
    the server within a few results instead of after megabytes of kernel buffering."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock
