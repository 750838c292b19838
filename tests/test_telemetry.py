"""SysfsSource against a fake kernel tree the test writes; choose_source's decisions.

The tree mirrors JETSON.md's "thermal zones in /sys/class/thermal/thermal_zone*/{type,temp}
(millidegrees C)" and the /proc/meminfo format (kB), plus the GPU load file jetson-stats 7.x reads
(`/sys/class/devfreq/<gpu>/device/load`, 0.1 %).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.watchdog.telemetry import (
    SysfsSource,
    Telemetry,
    TelemetryError,
    choose_source,
    parse_meminfo,
    telemetry_from_jtop,
)

KB = 1024
# AGX Orin 32 GB reports about this much MemTotal.
ORIN_TOTAL_KB = 30_000_000


class FakeSysfs:
    """A writable stand-in for `/` with the files SysfsSource reads."""

    def __init__(self, root: Path, zones: dict[str, float] | None = None) -> None:
        self.root = root
        self._zone_dirs: dict[str, Path] = {}
        default = {"cpu-thermal": 50.0, "gpu-thermal": 50.0}
        for name, celsius in (default if zones is None else zones).items():
            self.add_zone(name, celsius)
        self.set_memory(ram_total_kb=ORIN_TOTAL_KB, ram_available_kb=ORIN_TOTAL_KB // 2)

    @property
    def meminfo(self) -> Path:
        return self.root / "proc" / "meminfo"

    def add_zone(self, name: str, celsius: float) -> Path:
        zone = self.root / "sys" / "class" / "thermal" / f"thermal_zone{len(self._zone_dirs)}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(name + "\n")
        self._zone_dirs[name] = zone
        self.set_temp(name, celsius)
        return zone

    def zone_dir(self, name: str) -> Path:
        return self._zone_dirs[name]

    def set_temp(self, name: str, celsius: float) -> None:
        (self._zone_dirs[name] / "temp").write_text(f"{round(celsius * 1000)}\n")

    def set_all_temps(self, celsius: float) -> None:
        for name in self._zone_dirs:
            self.set_temp(name, celsius)

    def set_memory(
        self,
        ram_total_kb: int,
        ram_available_kb: int,
        swap_total_kb: int = 4_000_000,
        swap_free_kb: int = 4_000_000,
    ) -> None:
        self.meminfo.parent.mkdir(parents=True, exist_ok=True)
        free = ram_available_kb // 2
        self.meminfo.write_text(
            f"MemTotal:       {ram_total_kb} kB\n"
            f"MemFree:        {free} kB\n"
            f"MemAvailable:   {ram_available_kb} kB\n"
            "Buffers:           12345 kB\n"
            "Cached:          1234567 kB\n"
            f"SwapTotal:      {swap_total_kb} kB\n"
            f"SwapFree:       {swap_free_kb} kB\n"
            "NvMapMemUsed:     524288 kB\n"
        )

    def set_ram_pct(self, pct: float) -> None:
        """Write meminfo so that (total - available) / total is `pct` percent."""
        available = round(ORIN_TOTAL_KB * (100.0 - pct) / 100.0)
        self.set_memory(ram_total_kb=ORIN_TOTAL_KB, ram_available_kb=available)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_sysfs_reads_zones_memory_and_swap_in_si_units(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path, {"cpu-thermal": 45.5, "gpu-thermal": 50.25, "tj-thermal": 51.0})
    fake.set_memory(
        ram_total_kb=32_000_000,
        ram_available_kb=8_000_000,
        swap_total_kb=4_000_000,
        swap_free_kb=3_000_000,
    )
    snap = SysfsSource(tmp_path, clock=FakeClock(12.5)).read()

    assert snap.temperatures_c == {"cpu-thermal": 45.5, "gpu-thermal": 50.25, "tj-thermal": 51.0}
    assert snap.max_temp_c == 51.0
    assert snap.hottest_zone == "tj-thermal"
    assert snap.ram_total_bytes == 32_000_000 * KB
    assert snap.ram_used_bytes == 24_000_000 * KB
    assert snap.ram_pct == pytest.approx(75.0)
    assert snap.swap_total_bytes == 4_000_000 * KB
    assert snap.swap_used_bytes == 1_000_000 * KB
    assert snap.gpu_load_pct is None
    assert snap.power_mw is None
    assert snap.source == "sysfs"
    assert snap.timestamp == 12.5


def test_sysfs_skips_offline_and_unreadable_zones_and_keeps_duplicate_types(
    tmp_path: Path,
) -> None:
    fake = FakeSysfs(tmp_path, {"cpu-thermal": 40.0})
    offline = fake.add_zone("cv0-thermal", 40.0)
    (offline / "temp").write_text("-256000\n")
    broken = fake.add_zone("soc0-thermal", 40.0)
    (broken / "temp").write_text("not a number\n")
    # A second zone with the same type (several boards have more than one cpu-thermal).
    dup = tmp_path / "sys" / "class" / "thermal" / "thermal_zone9"
    dup.mkdir()
    (dup / "type").write_text("cpu-thermal\n")
    (dup / "temp").write_text("61500\n")

    snap = SysfsSource(tmp_path).read()

    assert snap.temperatures_c == {"cpu-thermal": 40.0, "cpu-thermal.9": 61.5}


def test_sysfs_gpu_load_from_devfreq_like_jetson_stats(tmp_path: Path) -> None:
    FakeSysfs(tmp_path)
    gpu = tmp_path / "sys" / "class" / "devfreq" / "17000000.gpu" / "device"
    (gpu / "of_node").mkdir(parents=True)
    (gpu / "of_node" / "name").write_text("gpu\n")
    (gpu / "load").write_text("537\n")
    # A devfreq entry that is not a GPU must be ignored.
    other = tmp_path / "sys" / "class" / "devfreq" / "15340000.vic" / "device"
    (other / "of_node").mkdir(parents=True)
    (other / "of_node" / "name").write_text("vic\n")
    (other / "load").write_text("999\n")

    assert SysfsSource(tmp_path).read().gpu_load_pct == pytest.approx(53.7)


def test_sysfs_gpu_load_legacy_platform_path(tmp_path: Path) -> None:
    FakeSysfs(tmp_path)
    legacy = tmp_path / "sys" / "devices" / "platform" / "gpu.0"
    legacy.mkdir(parents=True)
    (legacy / "load").write_text("1000\n")
    assert SysfsSource(tmp_path).read().gpu_load_pct == 100.0
    (legacy / "load").write_text("garbage\n")
    # GPU load is informational: a bad file leaves it unknown, the snapshot still reads.
    snap = SysfsSource(tmp_path).read()
    assert snap.gpu_load_pct is None
    assert snap.max_temp_c == 50.0


def test_sysfs_errors_name_the_missing_file(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path)
    fake.meminfo.unlink()
    with pytest.raises(TelemetryError, match="meminfo"):
        SysfsSource(tmp_path).read()

    fake.meminfo.write_text("MemTotal: 1000 kB\n")
    with pytest.raises(TelemetryError, match="MemAvailable"):
        SysfsSource(tmp_path).read()

    fake.set_memory(ram_total_kb=1000, ram_available_kb=500)
    fake.set_all_temps(40.0)
    for name in ("cpu-thermal", "gpu-thermal"):
        (fake.zone_dir(name) / "temp").write_text("garbage")
    with pytest.raises(TelemetryError, match="no readable thermal zone"):
        SysfsSource(tmp_path).read()


def test_host_without_thermal_zones_is_watched_for_memory_only(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "vm", {})
    fake.set_memory(ram_total_kb=1000, ram_available_kb=100)
    snap = SysfsSource(tmp_path / "vm").read()
    assert snap.temperatures_c == {}
    assert snap.max_temp_c is None
    assert snap.ram_pct == 90.0
    _, reason = choose_source(Settings(telemetry_source="sysfs", sysfs_root=tmp_path / "vm"))
    assert (
        reason
        == f"TELEMETRY_SOURCE=sysfs: reading {tmp_path / 'vm'} (no thermal zones: memory only)"
    )


def test_parse_meminfo_converts_kb_to_bytes() -> None:
    parsed = parse_meminfo("MemTotal: 10 kB\nHugePages_Total: 3\nbad line\nX: y kB\n")
    assert parsed == {"MemTotal": 10 * KB, "HugePages_Total": 3}


def test_telemetry_as_dict_is_json_ready() -> None:
    snap = telemetry_from_jtop(
        {"tj": {"online": True, "temp": 70.125}},
        {"RAM": {"tot": 1000, "used": 250}, "SWAP": {"tot": 0, "used": 0}},
        {},
        {},
        timestamp=5.0,
    )
    assert isinstance(snap, Telemetry)
    assert snap.as_dict() == {
        "source": "jtop",
        "temperatures_c": {"tj": 70.12},
        "max_temp_c": 70.125,
        "ram_used_bytes": 250 * KB,
        "ram_total_bytes": 1000 * KB,
        "ram_pct": 25.0,
        "swap_used_bytes": 0,
        "swap_total_bytes": 0,
        "gpu_load_pct": None,
        "power_mw": None,
        "timestamp": 5.0,
    }


def test_choose_source_sysfs_when_asked(tmp_path: Path) -> None:
    FakeSysfs(tmp_path)
    settings = Settings(telemetry_source="sysfs", sysfs_root=tmp_path)
    source, reason = choose_source(settings)
    assert source.name == "sysfs"
    assert isinstance(source, SysfsSource)
    assert source.root == tmp_path
    assert reason == f"TELEMETRY_SOURCE=sysfs: reading {tmp_path}"


@pytest.mark.filterwarnings("ignore:distro.linux_distribution:DeprecationWarning")
def test_choose_source_auto_falls_back_to_sysfs_without_a_jtop_service(tmp_path: Path) -> None:
    """No jtop service runs here (nothing listens on /run/jtop.sock), or jetson-stats is not
    installed at all: either way `auto` must read sysfs and say why."""
    settings = Settings(telemetry_source="auto", sysfs_root=tmp_path)
    source, reason = choose_source(settings)
    assert source.name == "sysfs"
    assert reason.startswith("TELEMETRY_SOURCE=auto: ")
    assert reason.endswith(f"; reading sysfs under {tmp_path} (no thermal zones: memory only)")
    assert "jetson-stats is not installed" in reason or "jtop service did not answer" in reason


@pytest.mark.filterwarnings("ignore:distro.linux_distribution:DeprecationWarning")
def test_choose_source_jtop_required_but_absent_fails_at_start(tmp_path: Path) -> None:
    settings = Settings(telemetry_source="jtop", sysfs_root=tmp_path)
    with pytest.raises(TelemetryError, match=r"^TELEMETRY_SOURCE=jtop but "):
        choose_source(settings)
