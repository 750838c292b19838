"""The watchdog inside the running app: real SysfsSource on a tree the test writes, real server.

The thermal zone files stand for JETSON.md's `/sys/class/thermal/thermal_zone*/{type,temp}`
(millidegrees C) and `/proc/meminfo` (AGX Orin's RAM is shared by CPU and GPU).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import b64, jpeg

GIB_KB = 1024 * 1024


def write_sysfs(root: Path, temp_c: float, ram_used_pct: float = 30.0) -> None:
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("tj-thermal\n")
    (zone / "temp").write_text(f"{int(temp_c * 1000)}\n")
    total = 32 * GIB_KB
    available = int(total * (1 - ram_used_pct / 100))
    meminfo = root / "proc/meminfo"
    meminfo.parent.mkdir(parents=True, exist_ok=True)
    meminfo.write_text(
        f"MemTotal: {total} kB\nMemFree: {available} kB\nMemAvailable: {available} kB\n"
        f"SwapTotal: 0 kB\nSwapFree: 0 kB\n"
    )


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def settings_for(root: Path) -> dict[str, Any]:
    return {
        "telemetry_source": "sysfs",
        "sysfs_root": root,
        "watchdog_interval_s": 0.05,
        "watchdog_min_dwell_s": 0.2,
        "retry_after_s": 4,
    }


async def test_critical_temperature_pauses_and_recovers_without_restart(
    serve: Any, tmp_path: Path
) -> None:
    write_sysfs(tmp_path, 60)
    client = await serve(**settings_for(tmp_path))
    payload = {"images": {"data": [b64(jpeg())]}}

    async def state_is(name: str) -> bool:
        body = await (await client.get("/health/ready")).json()
        return bool(body["checks"]["watchdog"]["state"] == name)

    assert await state_is("ok")
    assert (await client.post("/extract", json=payload)).status == 200
    ws = await client.ws_connect("/ws/stream")

    write_sysfs(tmp_path, 98)
    await wait_for(lambda: state_is("critical"))
    closed = await ws.receive(timeout=5)
    while closed.type == aiohttp.WSMsgType.TEXT:  # a status push may precede the close
        closed = await ws.receive(timeout=5)
    assert closed.type == aiohttp.WSMsgType.CLOSE
    assert closed.data == 1013
    resp = await client.post("/extract", json=payload)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "4"
    assert (await resp.json())["error"]["code"] == "inference_paused"
    ready = await client.get("/health/ready")
    assert ready.status == 503
    body = await ready.json()
    assert body["checks"]["watchdog"]["readings"]["temperatures_c"]["tj-thermal"] == 98.0
    metrics = await (await client.get("/metrics")).text()
    assert re.search(r"^appliance_governor_state 3\.0$", metrics, re.M)
    assert re.search(r'^appliance_temperature_celsius\{zone="tj-thermal"\} 98\.0$', metrics, re.M)

    write_sysfs(tmp_path, 60)
    await wait_for(lambda: state_is("ok"))
    assert (await client.post("/extract", json=payload)).status == 200
    assert (await client.get("/health/ready")).status == 200


async def test_memory_pressure_sheds_new_streams(serve: Any, tmp_path: Path) -> None:
    write_sysfs(tmp_path, 50, ram_used_pct=92)
    client = await serve(**settings_for(tmp_path))
    body = await (await client.get("/health/ready")).json()
    assert body["checks"]["watchdog"]["state"] == "hot"
    ws = await client.ws_connect("/ws/stream")
    msg = await ws.receive(timeout=5)
    while msg.type == aiohttp.WSMsgType.TEXT:
        msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert msg.data == 1013
    # REST still serves while hot, with a wider batch window.
    assert (await client.post("/extract", json={"images": {"data": [b64(jpeg())]}})).status == 200
    info = await (await client.get("/info")).json()
    assert info["watchdog"]["effects"]["batch_window_factor"] == 4.0
    assert info["watchdog"]["source"] == "sysfs"
