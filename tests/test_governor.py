"""The governor driven by the real SysfsSource reading files this test writes (DESIGN section 5).

Defaults used throughout: warm/hot/critical at 80/90/97 C and 80/90/95 % RAM, margins 3 C / 3 %,
dwell 3 s, fail limit 3. Time is a fake clock advanced one second per tick.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.watchdog.governor import (
    EFFECTS,
    STATE_VALUES,
    Effects,
    Governor,
    Thresholds,
    Transition,
)
from appliance.watchdog.telemetry import SysfsSource, TelemetryError
from tests.test_telemetry import FakeClock, FakeSysfs


class Rig:
    """A fake tree, the real source reading it, a governor, and a clock ticking 1 s per read."""

    def __init__(self, root: Path, **settings: float) -> None:
        self.fake = FakeSysfs(root, {"cpu-thermal": 60.0, "gpu-thermal": 55.0, "tj-thermal": 60.0})
        self.clock = FakeClock(0.0)
        self.source = SysfsSource(root, clock=self.clock)
        self.governor = Governor.from_settings(Settings(**settings))  # type: ignore[arg-type]
        self.transitions: list[Transition] = []

    def tick(self) -> Transition | None:
        self.clock.now += 1.0
        try:
            reading = self.source.read()
        except TelemetryError as exc:
            result = self.governor.update(exc, self.clock.now)
        else:
            result = self.governor.update(reading, self.clock.now)
        if result is not None:
            self.transitions.append(result)
        return result

    def tj(self, celsius: float) -> Transition | None:
        """The hottest zone at `celsius`, the others cooler, then one tick."""
        self.fake.set_temp("tj-thermal", celsius)
        self.fake.set_temp("cpu-thermal", celsius - 2.0)
        return self.tick()

    def path(self) -> list[str]:
        return [str(self.transitions[0].from_state)] + [t.to_state for t in self.transitions]


def test_ramp_60_98_60_passes_every_state_in_order_and_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    up = list(range(60, 99, 2))  # 60, 62, ..., 98
    down = list(range(98, 59, -2))
    temps_at_change: list[tuple[str, float, float]] = []
    for celsius in up + down:
        t = rig.tj(float(celsius))
        if t is not None:
            temps_at_change.append((t.to_state, float(celsius), rig.clock.now))

    assert rig.path() == ["ok", "warm", "hot", "critical", "hot", "warm", "ok"]
    # Up: immediately at the first reading over each threshold (80, 90, 97 -> 98 is the first
    # even value >= 97). Down: once the value sits below threshold - 3 C for 3 s, one level at
    # a time, each level with its own dwell.
    assert temps_at_change == [
        ("warm", 80.0, 11.0),
        ("hot", 90.0, 16.0),
        ("critical", 98.0, 20.0),
        # The way down starts at 98 again at t=21; 92 (< 94) at t=24 starts the dwell, and 3 s
        # later, at t=27, the value is 86.
        ("hot", 86.0, 27.0),
        # 86 < 87 already, so hot's dwell starts at t=27 and ends at t=30 (80 C).
        ("warm", 80.0, 30.0),
        # 76 (< 77) at t=32 starts warm's dwell; t=35 reads 70.
        ("ok", 70.0, 35.0),
    ]
    up_reasons = [t.reason for t in rig.transitions[:3]]
    assert up_reasons == [
        "tj-thermal 80.0 C >= 80.0 C",
        "tj-thermal 90.0 C >= 90.0 C",
        "tj-thermal 98.0 C >= 97.0 C",
    ]
    assert rig.transitions[3].reason == (
        "all values below critical release (94.0 C, RAM 92.0%) for 3.0 s"
    )
    # The snapshot that caused each change travels with it.
    crit = rig.transitions[2].snapshot
    assert crit is not None and crit.temperatures_c["tj-thermal"] == 98.0
    assert rig.governor.state == "ok"


def test_value_hovering_at_warm_threshold_changes_state_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    for i in range(60):
        rig.tj(80.5 if i % 2 else 79.5)
    # One step up at the first 80.5; 79.5 never gets below the release limit of 77.
    assert [(t.from_state, t.to_state) for t in rig.transitions] == [("ok", "warm")]
    assert rig.transitions[0].at == 2.0


def test_value_dipping_below_release_shorter_than_dwell_does_not_flap(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    # Two ticks at 76 (< 77 release) then two at 81: the dip lasts 1 s, the dwell needs 3 s.
    for i in range(80):
        rig.tj(76.0 if i % 4 in (0, 1) else 81.0)
    assert [(t.from_state, t.to_state) for t in rig.transitions] == [("ok", "warm")]


def test_hovering_at_hot_and_critical_thresholds_without_dwell_still_does_not_flap(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, watchdog_min_dwell_s=0.0)
    for i in range(50):
        rig.tj(90.5 if i % 2 else 89.5)
    for i in range(50):
        rig.tj(97.5 if i % 2 else 96.5)
    # 100 readings, 3 changes: the first 89.5 is warm, the first 90.5 hot, the first 97.5
    # critical; hysteresis alone then holds each state (89.5 >= 87, 96.5 >= 94).
    assert rig.path() == ["ok", "warm", "hot", "critical"]
    assert [t.at for t in rig.transitions] == [1.0, 2.0, 52.0]


def test_down_needs_the_full_dwell(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.tj(85.0)
    assert rig.governor.state == "warm"
    assert rig.tj(70.0) is None  # t=2: dwell starts
    assert rig.tj(70.0) is None  # t=3
    assert rig.tj(70.0) is None  # t=4: 2 s so far
    t = rig.tj(70.0)  # t=5: 3 s
    assert t is not None and (t.from_state, t.to_state, t.at) == ("warm", "ok", 5.0)


def test_memory_pressure_raises_state_and_releases_with_margin(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.fake.set_all_temps(50.0)
    steps = [(50.0, "ok"), (85.0, "warm"), (92.0, "hot"), (96.0, "critical")]
    for pct, expected in steps:
        rig.fake.set_ram_pct(pct)
        rig.tick()
        assert rig.governor.state == expected, pct
    assert [t.reason for t in rig.transitions] == [
        "RAM 85.0% >= 80.0%",
        "RAM 92.0% >= 90.0%",
        "RAM 96.0% >= 95.0%",
    ]
    snap = rig.transitions[-1].snapshot
    assert snap is not None
    assert snap.ram_used_bytes == round(30_000_000 * 0.96) * 1024
    # 93 % is below 95 but not below 95 - 3: critical holds however long it lasts.
    rig.fake.set_ram_pct(93.0)
    for _ in range(10):
        assert rig.tick() is None
    assert rig.governor.state == "critical"
    rig.fake.set_ram_pct(50.0)
    for _ in range(12):
        rig.tick()
    assert rig.path() == ["ok", "warm", "hot", "critical", "hot", "warm", "ok"]


def test_read_errors_lead_to_unknown_after_the_limit_and_recover(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.tj(85.0)
    assert rig.governor.state == "warm"
    rig.fake.meminfo.unlink()
    assert rig.tick() is None
    assert rig.tick() is None
    # Below the limit the last known state is kept.
    assert rig.governor.state == "warm"
    assert rig.governor.consecutive_failures == 2
    t = rig.tick()
    assert t is not None
    assert (t.from_state, t.to_state) == ("warm", "unknown")
    assert t.reason == "telemetry failed 3 times in a row"
    assert t.snapshot is None
    assert t.error is not None and "meminfo" in t.error
    assert rig.governor.last_error == t.error
    # More failures: no repeated transition.
    for _ in range(5):
        assert rig.tick() is None
    assert rig.governor.consecutive_failures == 8

    # Reads work again at 92 C: straight to that reading's level, no dwell.
    rig.fake.set_memory(ram_total_kb=30_000_000, ram_available_kb=20_000_000)
    t = rig.tj(92.0)
    assert t is not None
    assert (t.from_state, t.to_state) == ("unknown", "hot")
    assert t.reason == "telemetry back: tj-thermal 92.0 C >= 90.0 C"
    assert rig.governor.consecutive_failures == 0
    assert rig.governor.last_error is None


def test_garbage_temperature_files_count_as_failures(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    for name in ("cpu-thermal", "gpu-thermal", "tj-thermal"):
        (rig.fake.zone_dir(name) / "temp").write_text("\x00\x01garbage")
    for _ in range(3):
        rig.tick()
    assert rig.path() == ["ok", "unknown"]
    assert rig.transitions[0].at == 3.0
    # Recovery to ok: a good reading below every threshold.
    rig.fake.set_all_temps(55.0)
    rig.tick()
    assert rig.path() == ["ok", "unknown", "ok"]


def test_a_failure_restarts_the_down_dwell(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.tj(85.0)
    rig.tj(70.0)  # t=2 dwell starts
    rig.tj(70.0)  # t=3
    rig.fake.meminfo.unlink()
    rig.tick()  # t=4 failure: no evidence of cooling
    rig.fake.set_memory(ram_total_kb=30_000_000, ram_available_kb=20_000_000)
    assert rig.tj(70.0) is None  # t=5 dwell restarts
    assert rig.tj(70.0) is None  # t=6
    assert rig.tj(70.0) is None  # t=7
    t = rig.tj(70.0)  # t=8
    assert t is not None and (t.to_state, t.at) == ("ok", 8.0)


def test_custom_thresholds_from_settings(tmp_path: Path) -> None:
    rig = Rig(tmp_path, temp_warm_c=50.0, temp_hot_c=60.0, temp_critical_c=70.0)
    rig.tj(65.0)
    assert rig.governor.state == "hot"
    assert rig.governor.thresholds == Thresholds(
        temp_c=(50.0, 60.0, 70.0), ram_pct=(80.0, 90.0, 95.0)
    )


def test_effects_per_state() -> None:
    expected = {
        "ok": Effects(1.0, True, False, 1.0, True),
        "warm": Effects(0.5, True, False, 1.0, True),
        "hot": Effects(0.25, False, False, 4.0, True),
        "critical": Effects(0.0, False, True, 4.0, False),
        "unknown": Effects(0.5, True, False, 1.0, True),
    }
    assert expected == EFFECTS
    assert EFFECTS["critical"].as_dict() == {
        "fps_factor": 0.0,
        "accept_new_streams": False,
        "inference_paused": True,
        "batch_window_factor": 4.0,
        "ready": False,
    }
    assert STATE_VALUES == {"ok": 0, "warm": 1, "hot": 2, "critical": 3, "unknown": -1}


def test_bad_governor_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="three increasing"):
        Thresholds(temp_c=(90.0, 80.0, 97.0))
    with pytest.raises(ValueError, match="fail_limit"):
        Governor(fail_limit=0)
