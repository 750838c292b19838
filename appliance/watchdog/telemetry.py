"""Telemetry snapshots of the device and the two sources that read them.

`JtopSource` talks to the jetson-stats service (`jtop.service.JtopManager` on /run/jtop.sock);
`SysfsSource` reads the kernel's files under a configurable root, so it runs anywhere (and tests
point it at a tree they write). `choose_source` picks one and says why, for /health and /info.

Facts taken from the installed jetson-stats 7.2.2 source (site-packages/jtop):
- `jtop.temperature` is `{name: {"online": bool, "temp": float C, ...}}`; offline sensors read
  -256 (`core/temperature.py`, `TEMPERATURE_OFFLINE`).
- `jtop.memory["RAM"]` / `["SWAP"]` have `"tot"` and `"used"` in KB (`core/memory.py`,
  `Memory.get_status`, built from /proc/meminfo which is in KB).
- `jtop.gpu` maps GPU name -> `{"type": "integrated", "status": {"load": float %}, ...}`; the
  load is `<devfreq>/device/load` divided by 10 (`core/gpu.py`, `igpu_read_status`), found by
  scanning /sys/class/devfreq/*/device/of_node/name for a GPU (`find_igpu`).
- `jtop.power` is `{"rail": {...}, "tot": {"power": mW, ...}}` or `{}` with no sensors
  (`core/power.py`, `PowerService.get_status`).
Nothing here imports `jtop` at module level: the package must import where it is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from appliance.config import Settings

# jetson-stats reports an offline thermal sensor as -256 C (core/temperature.py).
JTOP_OFFLINE_TEMP_C = -256.0
# The kernel's thermal zones can report similar sentinels when a sensor is off or unreadable;
# nothing on a running board is colder than this.
_MIN_PLAUSIBLE_C = -100.0
# Known integrated-GPU device-tree names (Orin: ga10b, Xavier: gv11b, TX2: gp10b, Nano: gb20b).
_IGPU_NAMES = ("gpu", "ga10b", "gv11b", "gp10b", "gm20b")


class TelemetryError(RuntimeError):
    """A source could not produce a snapshot (missing or unparsable file, lost service)."""


@dataclasses.dataclass(frozen=True)
class Telemetry:
    """One reading of the device.

    temperatures_c: thermal zone name -> degrees C (offline sensors left out).
    ram_* / swap_*: bytes. gpu_load_pct: 0..100 or None where unknown. power_mw: total board
    power in milliwatts or None. timestamp: the clock value (monotonic seconds) of the read.
    """

    temperatures_c: Mapping[str, float]
    ram_used_bytes: int
    ram_total_bytes: int
    swap_used_bytes: int
    swap_total_bytes: int
    gpu_load_pct: float | None
    power_mw: float | None
    source: str
    timestamp: float

    @property
    def ram_pct(self) -> float:
        return 100.0 * self.ram_used_bytes / self.ram_total_bytes if self.ram_total_bytes else 0.0

    @property
    def max_temp_c(self) -> float | None:
        return max(self.temperatures_c.values()) if self.temperatures_c else None

    @property
    def hottest_zone(self) -> str | None:
        if not self.temperatures_c:
            return None
        return max(self.temperatures_c, key=lambda k: self.temperatures_c[k])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for /health and log events."""
        return {
            "source": self.source,
            "temperatures_c": {k: round(v, 2) for k, v in sorted(self.temperatures_c.items())},
            "max_temp_c": self.max_temp_c,
            "ram_used_bytes": self.ram_used_bytes,
            "ram_total_bytes": self.ram_total_bytes,
            "ram_pct": round(self.ram_pct, 2),
            "swap_used_bytes": self.swap_used_bytes,
            "swap_total_bytes": self.swap_total_bytes,
            "gpu_load_pct": self.gpu_load_pct,
            "power_mw": self.power_mw,
            "timestamp": self.timestamp,
        }


@runtime_checkable
class TelemetrySource(Protocol):
    """What the watchdog needs from a source. `read` may block; it runs in a thread."""

    @property
    def name(self) -> str: ...

    def read(self) -> Telemetry: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- sysfs


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise TelemetryError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {key: bytes}. Values there are in kB (really KiB)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        unit = parts[1].lower() if len(parts) > 1 else ""
        out[key.strip()] = value * 1024 if unit == "kb" else value
    return out


class SysfsSource:
    """Reads the kernel's files under `root` (normally `/`).

    - `<root>/sys/class/thermal/thermal_zone*/{type,temp}`: millidegrees C.
    - `<root>/proc/meminfo`: MemTotal, MemAvailable (used = total - available), SwapTotal,
      SwapFree. MemAvailable rather than jtop's total-free-buffers-cached, because it is the
      kernel's own estimate of what can still be allocated without swapping.
    - GPU load, where present: the same file jetson-stats reads, `<devfreq>/device/load` for the
      `/sys/class/devfreq/*` entry whose `device/of_node/name` names a GPU (Orin: 17000000.gpu,
      name "gpu" or "ga10b"), else the legacy `/sys/devices/platform/gpu.0/load`. Value in 0.1 %.
    A zone whose file cannot be read or parsed is skipped; zones that exist but none of which
    can be read, or an unreadable/garbled meminfo, raise TelemetryError. A host with no thermal
    zone at all (a VM, a CI container) gives empty temperatures: only memory is watched there.
    """

    name = "sysfs"

    def __init__(self, root: Path = Path("/"), clock: Any = time.monotonic) -> None:
        self.root = Path(root)
        self._clock = clock

    def read(self) -> Telemetry:
        temps = self._read_temperatures()
        mem = parse_meminfo(_read_text(self.root / "proc" / "meminfo"))
        try:
            ram_total = mem["MemTotal"]
            ram_available = mem["MemAvailable"]
        except KeyError as exc:
            raise TelemetryError(f"{self.root / 'proc/meminfo'} has no {exc.args[0]}") from None
        if ram_total <= 0:
            raise TelemetryError(f"{self.root / 'proc/meminfo'}: MemTotal is {ram_total}")
        swap_total = mem.get("SwapTotal", 0)
        swap_free = mem.get("SwapFree", swap_total)
        return Telemetry(
            temperatures_c=temps,
            ram_used_bytes=max(0, ram_total - ram_available),
            ram_total_bytes=ram_total,
            swap_used_bytes=max(0, swap_total - swap_free),
            swap_total_bytes=swap_total,
            gpu_load_pct=self._read_gpu_load(),
            power_mw=None,
            source=self.name,
            timestamp=float(self._clock()),
        )

    def close(self) -> None:
        pass

    def describe(self) -> str:
        """The root, and a warning when it has no thermal zone (for /health's reason)."""
        base = self.root / "sys" / "class" / "thermal"
        if any(base.glob("thermal_zone*")):
            return str(self.root)
        return f"{self.root} (no thermal zones: memory only)"

    def _read_temperatures(self) -> dict[str, float]:
        base = self.root / "sys" / "class" / "thermal"
        zones = sorted(base.glob("thermal_zone*"))
        temps: dict[str, float] = {}
        errors: list[str] = []
        for zone in zones:
            try:
                raw = (zone / "temp").read_text().strip()
                milli = int(raw)
            except (OSError, ValueError) as exc:
                errors.append(f"{zone.name}: {exc}")
                continue
            celsius = milli / 1000.0
            if celsius <= _MIN_PLAUSIBLE_C:
                continue  # sensor offline
            try:
                name = (zone / "type").read_text().strip() or zone.name
            except OSError:
                name = zone.name
            # Two zones can share a type (several "cpu-thermal" on some boards): keep both.
            if name in temps:
                name = f"{name}.{zone.name.removeprefix('thermal_zone')}"
            temps[name] = celsius
        if zones and not temps and errors:
            # Zones exist but none could be read: the thermal half of the watchdog is blind.
            raise TelemetryError(f"no readable thermal zone under {base}: {'; '.join(errors)}")
        # No zones at all (a VM, a CI container): memory is still watched; choose_source says so.
        return temps

    def _gpu_load_file(self) -> Path | None:
        devfreq = self.root / "sys" / "class" / "devfreq"
        if devfreq.is_dir():
            for entry in sorted(devfreq.iterdir()):
                try:
                    of_name = (entry / "device" / "of_node" / "name").read_text().strip().lower()
                except OSError:
                    continue
                if any(n in of_name for n in _IGPU_NAMES) and (entry / "device" / "load").exists():
                    return entry / "device" / "load"
        legacy = self.root / "sys" / "devices" / "platform" / "gpu.0" / "load"
        return legacy if legacy.exists() else None

    def _read_gpu_load(self) -> float | None:
        path = self._gpu_load_file()
        if path is None:
            return None
        try:
            return min(100.0, max(0.0, int(path.read_text().strip()) / 10.0))
        except (OSError, ValueError):
            # GPU load is informational; a bad read must not fail the whole snapshot.
            return None


# --------------------------------------------------------------------------- jtop


def _kb(section: Mapping[str, Any] | None, key: str) -> int:
    if not section:
        return 0
    return int(section.get(key, 0)) * 1024


def telemetry_from_jtop(
    temperature: Mapping[str, Any],
    memory: Mapping[str, Any],
    gpu: Mapping[str, Any],
    power: Mapping[str, Any],
    timestamp: float,
    source: str = "jtop",
) -> Telemetry:
    """Map jetson-stats 7.x properties (shapes in the module docstring) to a Telemetry."""
    temps: dict[str, float] = {}
    for zone, values in temperature.items():
        if not isinstance(values, Mapping):
            continue
        temp = values.get("temp")
        if temp is None or not values.get("online", True):
            continue
        if float(temp) <= JTOP_OFFLINE_TEMP_C:
            continue
        temps[str(zone)] = float(temp)
    ram = memory.get("RAM")
    if not ram or not ram.get("tot"):
        raise TelemetryError("jtop reported no RAM totals")
    loads = [
        float(g["status"]["load"])
        for g in gpu.values()
        if isinstance(g, Mapping) and isinstance(g.get("status"), Mapping) and "load" in g["status"]
    ]
    total = power.get("tot") if power else None
    power_mw = float(total["power"]) if isinstance(total, Mapping) and "power" in total else None
    return Telemetry(
        temperatures_c=temps,
        ram_used_bytes=_kb(ram, "used"),
        ram_total_bytes=_kb(ram, "tot"),
        swap_used_bytes=_kb(memory.get("SWAP"), "used"),
        swap_total_bytes=_kb(memory.get("SWAP"), "tot"),
        gpu_load_pct=max(loads) if loads else None,
        power_mw=power_mw,
        source=source,
        timestamp=timestamp,
    )


class JtopSource:
    """Reads the jetson-stats service through its own client (`from jtop import jtop`).

    The constructor connects (and raises if the service does not answer), so `choose_source`
    learns at start-up whether jtop is usable. The client keeps one connection and a reader
    thread; a read after a lost connection reconnects once before failing.
    """

    name = "jtop"

    def __init__(self, interval_s: float = 1.0, clock: Any = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._client: Any = None
        self._connect()

    def _connect(self) -> None:
        from jtop import jtop  # optional dependency: imported only when this source is used

        client = jtop(interval=self._interval_s)
        client.start()  # raises jtop.JtopException when the service is absent or refuses us
        self._client = client

    def read(self) -> Telemetry:
        if self._client is None:
            self._connect()
        client = self._client
        try:
            # spin=True: do not block waiting for fresh data; re-raises the reader thread's error.
            if not client.ok(spin=True):
                raise TelemetryError("jtop client stopped")
            return telemetry_from_jtop(
                client.temperature,
                client.memory,
                client.gpu,
                client.power,
                timestamp=float(self._clock()),
                source=self.name,
            )
        except TelemetryError:
            self.close()
            raise
        except Exception as exc:
            # The next read reconnects: the service may have been restarted.
            self.close()
            raise TelemetryError(f"jtop read failed: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # Closing a half-dead client must never mask the error that got us here.
            with contextlib.suppress(Exception):
                client.close()


def choose_source(settings: Settings) -> tuple[TelemetrySource, str]:
    """Pick the source named by TELEMETRY_SOURCE; `auto` tries jtop, then sysfs.

    Returns the source and a sentence for /health and /info saying why it was chosen.
    `jtop` explicitly chosen but unavailable raises TelemetryError: the operator asked for it.
    """
    mode = settings.telemetry_source
    sysfs = SysfsSource(settings.sysfs_root)
    sysfs_note = sysfs.describe()
    if mode == "sysfs":
        return sysfs, f"TELEMETRY_SOURCE=sysfs: reading {sysfs_note}"
    try:
        source = JtopSource(interval_s=settings.watchdog_interval_s)
    except ImportError:
        problem = "jetson-stats is not installed"
    except Exception as exc:  # JtopException, OSError, AuthenticationError, ...
        problem = f"jtop service did not answer: {type(exc).__name__}: {_one_line(exc)}"
    else:
        return source, f"TELEMETRY_SOURCE={mode}: jtop service answered"
    if mode == "jtop":
        raise TelemetryError(f"TELEMETRY_SOURCE=jtop but {problem}")
    return sysfs, f"TELEMETRY_SOURCE=auto: {problem}; reading sysfs under {sysfs_note}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = [
    "JTOP_OFFLINE_TEMP_C",
    "JtopSource",
    "SysfsSource",
    "Telemetry",
    "TelemetryError",
    "TelemetrySource",
    "choose_source",
    "parse_meminfo",
    "telemetry_from_jtop",
]
