"""Issue 12 defect 8: tests never read the CI host's /sys and /proc/meminfo."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.api.watchdog_wiring import WATCHDOG
from appliance.config import Settings


async def wait_first_reading(client: Any) -> dict[str, Any]:
    watchdog = client.server.app[WATCHDOG]
    for _ in range(200):
        health: dict[str, Any] = watchdog.health()
        if health["readings"] is not None:
            return health
        await asyncio.sleep(0.025)
    raise AssertionError("the watchdog never read its telemetry")


def test_defect8_test_settings_name_their_telemetry_source(
    make_settings: Callable[..., Settings], calm_sysfs: Path
) -> None:
    settings = make_settings()
    assert settings.telemetry_source == "sysfs"
    assert settings.sysfs_root == calm_sysfs != Path("/")


async def test_defect8_served_app_reads_the_test_tree_not_the_host(
    serve: Any, calm_sysfs: Path
) -> None:
    client = await serve(watchdog_interval_s=0.05)
    health = await wait_first_reading(client)
    assert health["source"] == "sysfs"
    assert health["reason"] == f"TELEMETRY_SOURCE=sysfs: reading {calm_sysfs}"
    # The calm tree's numbers, whatever the runner's temperature and memory are.
    assert health["readings"]["temperatures_c"] == {"cpu-thermal": 45.0}
    assert health["readings"]["ram_total_bytes"] == 32 * 1024**3
    assert health["state"] == "ok"
