"""The Watchdog service: its polling loop over the real SysfsSource, subscribers, health, logs."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog

from appliance.config import Settings
from appliance.watchdog.governor import Transition
from appliance.watchdog.service import Watchdog
from appliance.watchdog.telemetry import SysfsSource, Telemetry
from tests.test_telemetry import FakeClock, FakeSysfs


def _settings(root: Path, **changes: Any) -> Settings:
    base: dict[str, Any] = {
        "telemetry_source": "sysfs",
        "sysfs_root": root,
        "watchdog_interval_s": 0.01,
        "watchdog_min_dwell_s": 0.0,
    }
    base.update(changes)
    return Settings(**base)


async def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def _other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_loop_delivers_transitions_to_subscribers_and_stop_cleans_up(
    tmp_path: Path,
) -> None:
    fake = FakeSysfs(tmp_path, {"cpu-thermal": 50.0, "tj-thermal": 50.0})
    watchdog = Watchdog(_settings(tmp_path))
    seen: list[Transition] = []
    unsubscribe = watchdog.subscribe(seen.append)

    await watchdog.start()
    assert watchdog.running
    assert watchdog.source_name == "sysfs"
    assert watchdog.source_reason == f"TELEMETRY_SOURCE=sysfs: reading {tmp_path}"
    # start() took a first reading before returning.
    assert watchdog.snapshot is not None and watchdog.snapshot.max_temp_c == 50.0
    assert watchdog.state_value == 0

    fake.set_temp("tj-thermal", 91.0)
    await _wait_for(lambda: watchdog.state == "hot")
    fake.set_temp("tj-thermal", 98.0)
    await _wait_for(lambda: watchdog.state == "critical")
    assert watchdog.effects.ready is False
    assert watchdog.effects.inference_paused is True
    assert watchdog.state_value == 3

    unsubscribe()
    fake.set_all_temps(40.0)
    # With no dwell, critical -> hot -> warm -> ok takes three ticks.
    await _wait_for(lambda: watchdog.state == "ok")
    await watchdog.stop()

    assert [(t.from_state, t.to_state) for t in seen] == [("ok", "hot"), ("hot", "critical")]
    assert watchdog.running is False
    assert watchdog.source_name == "none"
    assert _other_tasks() == set()
    await watchdog.stop()  # idempotent


async def test_poll_once_reports_failures_in_health_and_logs_transitions(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path, {"tj-thermal": 50.0})
    clock = FakeClock(100.0)
    watchdog = Watchdog(
        _settings(tmp_path, telemetry_fail_limit=2),
        source=SysfsSource(tmp_path, clock=clock),
        clock=clock,
    )
    assert watchdog.source_reason == "source given by the caller"
    seen: list[Transition] = []
    watchdog.subscribe(seen.append)

    with structlog.testing.capture_logs() as logs:
        assert await watchdog.poll_once() is None
        fake.set_temp("tj-thermal", 85.0)
        clock.now = 101.0
        warm = await watchdog.poll_once()
        fake.meminfo.write_text("garbage without numbers\n")
        clock.now = 102.0
        assert await watchdog.poll_once() is None
        clock.now = 103.0
        unknown = await watchdog.poll_once()

    assert warm is not None and (warm.from_state, warm.to_state) == ("ok", "warm")
    assert unknown is not None and (unknown.from_state, unknown.to_state) == ("warm", "unknown")
    assert seen == [warm, unknown]

    changes = [e for e in logs if e["event"] == "governor_state_changed"]
    assert changes[0] == {
        "event": "governor_state_changed",
        "log_level": "warning",
        "from_state": "ok",
        "to_state": "warm",
        "reason": "tj-thermal 85.0 C >= 80.0 C",
        "source": "sysfs",
        "error": None,
        "max_temp_c": 85.0,
        "hottest_zone": "tj-thermal",
        "ram_pct": 50.0,
        "ram_used_bytes": 15_000_000 * 1024,
        "ram_total_bytes": 30_000_000 * 1024,
        "swap_used_bytes": 0,
        "gpu_load_pct": None,
        "power_mw": None,
    }
    assert changes[1]["to_state"] == "unknown"
    assert "MemTotal" in changes[1]["error"]
    # One read-failure event per run of failures, not one per tick.
    assert [e["event"] for e in logs].count("telemetry_read_failed") == 1

    health = watchdog.health()
    assert health["state"] == "unknown"
    assert health["state_value"] == -1
    assert health["source"] == "sysfs"
    assert health["consecutive_failures"] == 2
    assert "MemTotal" in health["error"]
    # Readings stay the last good ones, with when they were taken.
    assert health["readings"]["max_temp_c"] == 85.0
    assert health["last_read_at"] == 101.0
    assert health["last_transition"] == {
        "from_state": "warm",
        "to_state": "unknown",
        "reason": "telemetry failed 2 times in a row",
        "at": 103.0,
        "error": health["error"],
    }
    # unknown behaves like warm.
    assert health["effects"] == {
        "fps_factor": 0.5,
        "accept_new_streams": True,
        "inference_paused": False,
        "batch_window_factor": 1.0,
        "ready": True,
    }

    fake.set_memory(ram_total_kb=30_000_000, ram_available_kb=15_000_000)
    clock.now = 104.0
    with structlog.testing.capture_logs() as logs:
        back = await watchdog.poll_once()
    assert back is not None and (back.from_state, back.to_state) == ("unknown", "warm")
    assert [e["event"] for e in logs] == ["telemetry_recovered", "governor_state_changed"]
    assert watchdog.health()["error"] is None
    await watchdog.stop()


class _ExplodingSource:
    """A source whose read raises something that is not a TelemetryError."""

    name = "exploding"

    def __init__(self) -> None:
        self.reads = 0
        self.closed = 0

    def read(self) -> Telemetry:
        self.reads += 1
        raise ZeroDivisionError("sensor driver bug")

    def close(self) -> None:
        self.closed += 1


async def test_any_read_exception_counts_as_failure_and_loop_keeps_running(tmp_path: Path) -> None:
    source = _ExplodingSource()
    watchdog = Watchdog(_settings(tmp_path, telemetry_fail_limit=3), source=source)
    seen: list[Transition] = []
    watchdog.subscribe(seen.append)

    def broken_subscriber(_: Transition) -> None:
        raise RuntimeError("subscriber bug")

    watchdog.subscribe(broken_subscriber)
    await watchdog.start()
    await _wait_for(lambda: source.reads >= 6)
    assert watchdog.running
    assert [(t.from_state, t.to_state) for t in seen] == [("ok", "unknown")]
    assert watchdog.last_error == "ZeroDivisionError: sensor driver bug"
    await watchdog.stop()
    assert source.closed == 1
    assert _other_tasks() == set()


class _HangingSource:
    """A read that blocks until released, like a wedged jtop socket."""

    name = "hanging"

    def __init__(self, root: Path) -> None:
        self.release = threading.Event()
        self.inner = SysfsSource(root)
        self.calls = 0

    def read(self) -> Telemetry:
        self.calls += 1
        self.release.wait(10.0)
        return self.inner.read()

    def close(self) -> None:
        self.release.set()


async def test_a_hung_read_times_out_counts_as_failure_and_is_not_stacked(tmp_path: Path) -> None:
    FakeSysfs(tmp_path, {"tj-thermal": 50.0})
    source = _HangingSource(tmp_path)
    watchdog = Watchdog(_settings(tmp_path, telemetry_fail_limit=2), source=source)
    watchdog.read_timeout_s = 0.05

    assert await watchdog.poll_once() is None
    assert watchdog.last_error == "TelemetryError: telemetry read took more than 0.1 s"
    t = await watchdog.poll_once()
    assert t is not None and t.to_state == "unknown"
    assert watchdog.last_error == "TelemetryError: previous telemetry read still running"
    # The second poll did not start a second blocked thread.
    assert source.calls == 1

    source.release.set()
    await _wait_for(lambda: watchdog._inflight is not None and watchdog._inflight.done())
    # The late result is stale: the next poll reads afresh (and no longer hangs). A loaded
    # machine may take longer than 0.05 s to run even a quick read in a thread.
    watchdog.read_timeout_s = 5.0
    back = await watchdog.poll_once()
    assert back is not None and (back.from_state, back.to_state) == ("unknown", "ok")
    assert source.calls == 2
    await watchdog.stop()


async def test_stop_while_a_read_hangs_leaves_no_task(tmp_path: Path) -> None:
    FakeSysfs(tmp_path, {"tj-thermal": 50.0})
    source = _HangingSource(tmp_path)
    watchdog = Watchdog(_settings(tmp_path), source=source)
    watchdog.read_timeout_s = 0.02
    await watchdog.poll_once()
    await watchdog.stop()
    assert _other_tasks() == set()
    assert source.release.is_set()


async def test_start_twice_is_refused_and_poll_without_source_is_an_error(tmp_path: Path) -> None:
    FakeSysfs(tmp_path)
    watchdog = Watchdog(_settings(tmp_path, watchdog_interval_s=5.0))
    with pytest.raises(RuntimeError, match="no telemetry source"):
        await watchdog.poll_once()
    await watchdog.start()
    with pytest.raises(RuntimeError, match="already started"):
        await watchdog.start()
    await watchdog.stop()
    assert _other_tasks() == set()
