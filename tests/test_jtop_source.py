"""JtopSource against the real jetson-stats client, fed by recorded data.

How: the test serves a recorded AGX Orin reading through jetson-stats' own
`jtop.service.JtopManager` (a multiprocessing SyncManager with the package's auth key), on a
socket in a temporary directory, exactly the three shared objects the real `JtopServer`
registers (`get_queue`, `sync_data`, `sync_event`) and the handshake it performs (answer
`{"interval": ...}` on the queue with `{"init": {...}}`). So the real `jtop.jtop` client runs
unchanged: connect, authenticate, version check, handshake, its reader thread, its
`temperature`/`memory`/`gpu`/`power` properties (JETSON.md, "jetson-stats (jtop)": "A test can
serve recorded data through that same manager class, so the real client code path runs").

The one thing changed is the socket path: `jtop.service.JTOP_PIPE` (a module constant read when
`JtopManager()` is built) points at the temp dir, since /run/jtop.sock needs root and the real
service. The recorded data has the shapes `JtopServer.jtop_decode` builds in jetson-stats 7.2.2
(`core/memory.py` Memory.get_status, `core/gpu.py` GPU.get_status, `core/power.py`
PowerService.get_status, `core/temperature.py`): RAM/SWAP in KB, offline sensors at -256 C.

jetson-stats is optional (the `jetson` extra): without it these tests are skipped.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

jtop_pkg = pytest.importorskip("jtop")
jtop_service = pytest.importorskip("jtop.service")

from appliance.config import Settings  # noqa: E402
from appliance.watchdog.governor import Governor  # noqa: E402
from appliance.watchdog.telemetry import (  # noqa: E402
    JtopSource,
    TelemetryError,
    choose_source,
    telemetry_from_jtop,
)

KB = 1024
# jetson-stats' own start-up thread calls a deprecated `distro` function; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:distro.linux_distribution:DeprecationWarning")

# One reading as the jtop service on an AGX Orin 32 GB sends it (values recorded, trimmed to
# the keys the client reads; `fan` and `gpu` keep their real structure).
RECORDED: dict[str, Any] = {
    "uptime": 1234.5,
    "cpu": {"total": {"user": 10.0, "nice": 0.0, "system": 3.0, "idle": 87.0}, "cpu": []},
    "gpu": {
        "gpu": {
            "type": "integrated",
            "status": {"railgate": False, "tpc_pg_mask": False, "3d_scaling": True, "load": 37.5},
            "freq": {"governor": "nvhost_podgov", "cur": 816000, "max": 1300500, "min": 306000},
            "power_control": "auto",
        }
    },
    "mem": {
        "RAM": {
            "tot": 30_536_296,
            "used": 6_107_259,
            "free": 20_000_000,
            "buffers": 100_000,
            "cached": 4_000_000,
            "shared": 524_288,
            "lfb": 1200,
        },
        "SWAP": {"tot": 15_268_144, "used": 1_024, "cached": 0, "table": {}},
    },
    "temperature": {
        "cpu": {"online": True, "temp": 52.5},
        "cv0": {"online": False, "temp": -256.0},
        "gpu": {"online": True, "temp": 50.9},
        "soc0": {"online": True, "temp": 49.8},
        "tj": {"online": True, "temp": 53.1},
    },
    "power": {
        "rail": {
            "VDD_GPU_SOC": {"online": True, "type": "INA3221", "power": 3200, "avg": 3100},
            "VDD_CPU_CV": {"online": True, "type": "INA3221", "power": 800, "avg": 790},
        },
        "tot": {"online": True, "type": "INA3221", "power": 9_874, "avg": 9_500, "name": "VDD_IN"},
    },
    "fan": {},
    "engines": {},
    "processes": [],
}


class RecordedJtopService:
    """jetson-stats' JtopManager serving recorded data, in threads of this process."""

    def __init__(self, data: dict[str, Any], interval: float = 0.05) -> None:
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.data: dict[str, Any] = copy.deepcopy(data)
        self.event = threading.Event()
        self.interval = interval
        self.handshakes = 0

        # A subclass keeps these registrations apart from the client's, which re-registers the
        # same names on JtopManager without callables (as in the real service/client split).
        class _ServiceSide(jtop_service.JtopManager):  # type: ignore[misc, name-defined]
            pass

        _ServiceSide.register("get_queue", callable=lambda: self.queue)
        _ServiceSide.register("sync_data", callable=lambda: self.data)
        _ServiceSide.register("sync_event", callable=lambda: self.event)
        self._server = _ServiceSide().get_server()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve, daemon=True),
            threading.Thread(target=self._control, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _serve(self) -> None:
        # SyncManager's Server.serve_forever ends with sys.exit(0), meant for its own process.
        with contextlib.suppress(SystemExit):
            self._server.serve_forever()

    def _control(self) -> None:
        """What JtopServer.run does with the queue: answer the handshake, publish data."""
        init = {
            "version": jtop_pkg.__version__,
            "board": {"hardware": {"Model": "NVIDIA Jetson AGX Orin Developer Kit"}},
            "interval": self.interval,
            "memory": [],
            "fan": {},
            "jc": False,
        }
        while not self._stop.is_set():
            try:
                message = self.queue.get(timeout=self.interval)
            except queue.Empty:
                message = {}
            if "interval" in message:
                self.handshakes += 1
                self.queue.put({"init": init})
                # Give the client the time to take the answer before this loop reads again.
                time.sleep(self.interval)
            self.event.set()

    def close(self) -> None:
        self._stop.set()
        self._server.stop_event.set()
        self._server.listener.close()
        for t in self._threads:
            t.join(timeout=3.0)


@pytest.fixture()
def jtop_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="jtop") as tmp:
        path = Path(tmp) / "jtop.sock"
        monkeypatch.setattr(jtop_service, "JTOP_PIPE", str(path))
        yield path


@pytest.fixture()
def service(jtop_socket: Path) -> Iterator[RecordedJtopService]:
    svc = RecordedJtopService(RECORDED)
    yield svc
    svc.close()


def _read_until(source: JtopSource, predicate: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        snap = source.read()
        if predicate(snap) or time.monotonic() > deadline:
            return snap
        time.sleep(0.02)


def test_jtop_source_reads_recorded_orin_data_through_the_real_client(
    service: RecordedJtopService,
) -> None:
    source = JtopSource(interval_s=0.05)
    try:
        snap = source.read()
    finally:
        source.close()
    assert service.handshakes >= 1
    assert snap.source == "jtop"
    # cv0 is offline (-256 C): left out.
    assert snap.temperatures_c == {"cpu": 52.5, "gpu": 50.9, "soc0": 49.8, "tj": 53.1}
    assert snap.max_temp_c == 53.1
    assert snap.ram_total_bytes == 30_536_296 * KB
    assert snap.ram_used_bytes == 6_107_259 * KB
    assert snap.ram_pct == pytest.approx(20.0, abs=0.01)
    assert snap.swap_total_bytes == 15_268_144 * KB
    assert snap.swap_used_bytes == 1_024 * KB
    assert snap.gpu_load_pct == 37.5
    assert snap.power_mw == 9_874.0


def test_jtop_source_follows_the_service_and_drives_the_governor(
    service: RecordedJtopService,
) -> None:
    source = JtopSource(interval_s=0.05)
    governor = Governor.from_settings(Settings())
    try:
        assert governor.update(source.read(), 1.0) is None
        service.data["temperature"]["tj"]["temp"] = 91.0
        snap = _read_until(source, lambda s: s.max_temp_c == 91.0)
        transition = governor.update(snap, 2.0)
    finally:
        source.close()
    assert transition is not None
    assert (transition.from_state, transition.to_state) == ("ok", "hot")
    assert transition.reason == "tj 91.0 C >= 90.0 C"


def test_choose_source_auto_picks_jtop_when_the_service_answers(
    service: RecordedJtopService, tmp_path: Path
) -> None:
    source, reason = choose_source(
        Settings(telemetry_source="auto", sysfs_root=tmp_path, watchdog_interval_s=0.05)
    )
    try:
        assert source.name == "jtop"
        assert reason == "TELEMETRY_SOURCE=auto: jtop service answered"
        assert source.read().gpu_load_pct == 37.5
    finally:
        source.close()


def test_lost_service_is_a_read_failure_not_a_crash(jtop_socket: Path) -> None:
    svc = RecordedJtopService(RECORDED)
    source = JtopSource(interval_s=0.05)
    try:
        assert source.read().max_temp_c == 53.1
        svc.close()
        # The client's reader thread notices within a few intervals; then reads fail with
        # TelemetryError (and each later read tries to reconnect, which fails too).
        deadline = time.monotonic() + 5.0
        error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                source.read()
            except TelemetryError as exc:
                error = exc
                break
            time.sleep(0.05)
        assert error is not None
        with pytest.raises(Exception) as second:
            source.read()
        assert type(second.value).__name__ in {"JtopException", "TelemetryError"}
    finally:
        source.close()


def test_jtop_without_service_gives_the_clients_own_error(jtop_socket: Path) -> None:
    with pytest.raises(jtop_pkg.JtopException, match=r"jtop\.service is not active"):
        JtopSource(interval_s=0.05)


def test_mapping_of_documented_shapes_without_gpu_or_power() -> None:
    """Boards without power sensors report `power == {}`; a GPU without a load file has no
    'load' in its status (core/gpu.py igpu_read_status)."""
    snap = telemetry_from_jtop(
        {"tj": {"online": True, "temp": 40.0}, "x": {"online": True, "temp": -256}},
        {"RAM": {"tot": 100, "used": 50}},
        {"gpu": {"type": "integrated", "status": {"railgate": False}}},
        {},
        timestamp=1.0,
    )
    assert snap.temperatures_c == {"tj": 40.0}
    assert (snap.gpu_load_pct, snap.power_mw) == (None, None)
    assert (snap.swap_total_bytes, snap.swap_used_bytes) == (0, 0)
    with pytest.raises(TelemetryError, match="no RAM"):
        telemetry_from_jtop({}, {}, {}, {}, timestamp=1.0)
