"""`appliance serve` as a process on loopback, under overload, slow clients, SIGTERM and a soak.

The load generator is benchmarks/overload.py (also run by hand for longer forms); these are
its short forms with the limits asserted. Every test prints its numbers (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks import overload as load

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))  # `make soak`: 1800
pytestmark = pytest.mark.timeout(600 + SOAK_SECONDS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("load")


@pytest.fixture
def server(workdir: Path) -> Iterator[load.Server]:
    with load.serve(workdir) as s:
        yield s


def report(name: str, numbers: dict[str, Any]) -> None:
    print(f"\n{name}: {json.dumps(numbers)}")


async def test_overload_answers_503_or_drops_frames_within_limits_and_recovers(
    server: load.Server,
) -> None:
    numbers = await load.overload(server, seconds=8, rest=24, streams=6)
    report("overload", numbers)
    statuses = numbers["statuses"]
    assert set(statuses) <= {200, 503}, statuses  # no 5xx but 503, no 504: admitted work ended
    assert statuses.get(503, 0) > 0 and statuses.get(200, 0) > 0  # past capacity, still serving
    assert numbers["missing_retry_after"] == 0
    assert numbers["non_json_errors"] == 0 and numbers["connection_errors"] == 0
    assert numbers["peak_queue_depth"] <= numbers["max_queue"]
    assert numbers["peak_pixels_in_flight"] <= numbers["pixels_limit"]
    # Streams were fed far faster than served: frames dropped, never a backlog or a close.
    assert numbers["stream_results"] < numbers["stream_frames_sent"]
    assert set(numbers["stream_closes"]) == {1000}  # closed by the client, not the server
    # Recovery: the first request once the load stops succeeds, and so does every later one.
    assert numbers["recovery_attempts"] == 1
    assert set(numbers["after_statuses"]) == {200}


async def test_slow_clients_cannot_hold_connections_or_memory(workdir: Path) -> None:
    with load.serve(workdir, BODY_TIMEOUT_S="2") as server:
        before = load.proc_status(server.proc.pid)
        slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(200):  # slowloris: headers, one byte of a 1 MB body, then nothing
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"POST /extract HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000\r\n\r\n{"
            )
            slow.append((reader, writer))
        # WebSocket clients that never read while the server has results for them.
        async with aiohttp.ClientSession() as session:
            readers = [await session.ws_connect(server.ws) for _ in range(4)]
            for ws in readers:
                for i in range(50):
                    await ws.send_bytes(load.frame(i % 3))
            # Meanwhile an honest client is served.
            async with session.post(f"{server.base}/extract", json=load.extract_body(1)) as r:
                assert r.status == 200
            during = load.proc_status(server.proc.pid)
            for ws in readers:
                await ws.close()
        answers = [await asyncio.wait_for(r.read(), 30) for r, _ in slow]
        for _, writer in slow:
            writer.close()
        await asyncio.sleep(1)  # the server's side of 200 sockets closes
        after = load.proc_status(server.proc.pid)
    timed_out = sum(a.startswith(b"HTTP/1.1 408") for a in answers)
    report(
        "slow_clients",
        {
            "slowloris": len(slow),
            "answered_408": timed_out,
            "fds": [before["fds"], during["fds"], after["fds"]],
            "rss_mb": [round(x["rss"] / 2**20, 1) for x in (before, during, after)],
        },
    )
    assert timed_out == len(slow)
    assert after["fds"] <= before["fds"] + 2
    assert during["rss"] - before["rss"] < 200 * 2**20


async def test_sigterm_finishes_accepted_work_closes_streams_1001_and_refuses_new(
    workdir: Path,
) -> None:
    with load.serve(workdir, SHUTDOWN_GRACE_S="60", REQUEST_IMAGE_CONCURRENCY="1") as server:
        body = load.extract_body(8)
        async with aiohttp.ClientSession() as session:
            streams = [await session.ws_connect(server.ws) for _ in range(2)]
            for ws in streams:
                await ws.receive_json()  # the first status: the stream is registered

            async def call() -> tuple[int, list[str]]:
                async with session.post(f"{server.base}/extract", json=body) as resp:
                    payload = await resp.json()
                    statuses = [d["status"] for d in payload.get("data", [])]
                    return resp.status, statuses or [payload.get("error", {}).get("code", "")]

            calls = [asyncio.ensure_future(call()) for _ in range(6)]
            # Accepted: the server has decoded pixels of these requests in flight.
            for _ in range(500):
                async with session.get(f"{server.base}/metrics") as r:
                    if load.metric(await r.text(), "appliance_pixels_in_flight") > 0:
                        break
            os.kill(server.proc.pid, signal.SIGTERM)
            stopped_at = asyncio.get_running_loop().time()
            results = await asyncio.gather(*calls)
            answered_in = asyncio.get_running_loop().time() - stopped_at
            codes = []
            for ws in streams:
                while (msg := await ws.receive(timeout=60)).type == aiohttp.WSMsgType.TEXT:
                    pass
                # The server's close frame (the client's own close_code turns 1006 when its
                # reply meets a socket the server has already closed).
                assert msg.type == aiohttp.WSMsgType.CLOSE
                codes.append(msg.data)
            async with aiohttp.ClientSession() as fresh:  # a new connection, not a kept one
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with fresh.get(f"{server.base}/health/live") as r:
                        await r.read()
        rc = server.proc.wait(timeout=90)
    log = server.log.read_text()
    report(
        "sigterm",
        {
            "requests": [s for s, _ in results],
            "answered_in_s": round(answered_in, 2),
            "stream_codes": codes,
            "rc": rc,
        },
    )
    # Nothing accepted is lost: a request whose body had arrived is answered in full. One
    # whose body was still arriving when shutdown began (aiohttp then stops reading) is told
    # at once to retry, never left to a 408 after BODY_TIMEOUT_S (30 s here).
    assert (200, ["ok"] * 8) in results
    assert all(r in ((200, ["ok"] * 8), (503, ["shutting_down"])) for r in results), results
    assert answered_in < 25, answered_in
    assert codes == [1001, 1001]
    assert rc == 0
    assert "unhandled_error" not in log and "Traceback" not in log


@pytest.mark.slow
async def test_soak_rest_and_streams_rss_fds_threads(server: load.Server) -> None:
    numbers = await load.soak(server, SOAK_SECONDS)
    report("soak", numbers)
    assert set(numbers["statuses"]) <= {200, 503} and numbers["statuses"].get(200, 0) > 0
    assert numbers["stream_results"] > 0
    assert numbers["rss_growth_pct"] < 5.0
    assert numbers["fds_after"] <= numbers["fds_before"]
    assert numbers["threads_after"] <= numbers["threads_before"]


async def test_sigterm_answers_a_body_still_arriving_503_at_once(workdir: Path) -> None:
    """A request whose headers arrived but whose body had not when SIGTERM came: aiohttp stops
    reading at shutdown, so without the server's own answer it would hang until
    BODY_TIMEOUT_S and get a 408 that blames the client."""
    with load.serve(workdir, SHUTDOWN_GRACE_S="60", BODY_TIMEOUT_S="60") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /extract HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"images": '
        )
        await writer.drain()
        # One round trip on another connection: the loop has taken in the headers above and
        # started their handler, which now waits for the rest of the body.
        await asyncio.sleep(0.5)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.base}/health/live") as r,
        ):
            assert r.status == 200
        os.kill(server.proc.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await asyncio.wait_for(reader.read(), 50)
        answered_in = loop.time() - started
        writer.close()
        rc = server.proc.wait(timeout=90)
    head, _, payload = answer.partition(b"\r\n\r\n")
    report("sigterm_body_arriving", {"answered_in_s": round(answered_in, 2), "rc": rc})
    assert head.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"retry-after:" in head.lower()
    assert json.loads(payload)["error"]["code"] == "shutting_down", payload
    assert answered_in < 10
    assert rc == 0
