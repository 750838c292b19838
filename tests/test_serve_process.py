"""The harness itself (tests/serve_process.py): it never yields a server that is not ready,
and never leaves one running behind a test, whatever the server does on SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import write_calm_sysfs
from tests.serve_process import ServeFailed, appliance_serve, serve_command

STUB = Path(__file__).with_name("stub_server.py")
# Slack on top of a timeout for a loaded, shared 2-core runner; far below a hang.
SLACK_S = 10.0


def stub(pid_file: Path, *flags: str) -> list[str]:
    return [sys.executable, str(STUB), str(pid_file), *flags]


def assert_gone(pid: int) -> None:
    # A child that was killed but not waited for is a zombie, and signal 0 still reaches it:
    # this fails unless the harness also reaped the process.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.timeout(60)
def test_server_ignoring_sigterm_is_killed_after_stop_timeout_and_reaped(tmp_path: Path) -> None:
    stop_timeout = 2.0
    argv = stub(tmp_path / "pid", "--ignore-sigterm")
    with serve_command(argv, name="stub", log_dir=tmp_path, stop_timeout=stop_timeout) as served:
        assert served.ready == {"status": "ready"}
        pid = served.proc.pid
        leaving = time.monotonic()
    took = time.monotonic() - leaving
    # SIGTERM first, and the whole grace given before SIGKILL...
    assert "SIGTERM received, ignoring it" in served.output()
    assert took >= stop_timeout
    # ...then killed, not waited on forever.
    assert took < stop_timeout + SLACK_S
    assert served.proc.returncode == -signal.SIGKILL
    assert_gone(pid)


@pytest.mark.timeout(60)
def test_server_never_ready_raises_serve_failed_with_its_output_and_is_stopped(
    tmp_path: Path,
) -> None:
    ready_timeout = 1.0
    argv = stub(tmp_path / "pid", "--never-ready")
    starting = time.monotonic()
    with (
        pytest.raises(ServeFailed) as failed,
        serve_command(argv, name="stub", log_dir=tmp_path, ready_timeout=ready_timeout),
    ):
        pytest.fail("yielded a server whose /health/ready answers 503")
    took = time.monotonic() - starting
    assert ready_timeout <= took < ready_timeout + SLACK_S
    assert failed.value.returncode is None  # still running when the harness gave up
    assert "stub was not ready within 1.0 s" in str(failed.value)
    # What the server printed comes with the error: why it never got ready.
    assert "stub_server: loading models on port" in failed.value.output
    assert "stub_server: loading models on port" in str(failed.value)
    assert_gone(int((tmp_path / "pid").read_text()))


@pytest.mark.timeout(60)
def test_failing_test_body_still_stops_the_server_gracefully(tmp_path: Path) -> None:
    with (
        pytest.raises(AssertionError, match="the test's own failure"),
        serve_command(stub(tmp_path / "pid"), name="stub", log_dir=tmp_path) as served,
    ):
        raise AssertionError("the test's own failure")
    # Ended by the SIGTERM (the stub keeps Python's default action), well inside the grace.
    assert served.proc.returncode == -signal.SIGTERM
    assert_gone(served.proc.pid)


def test_calm_telemetry_overrides_the_shell_and_yields_to_the_caller(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As if exported in the developer's shell. The source is one every host rejects at start:
    # whether it reached the server shows, whatever this machine's /sys or jtop would say.
    bogus = "no-such-source"
    monkeypatch.setenv("TELEMETRY_SOURCE", bogus)
    shells_tree = write_calm_sysfs(tmp_path / "shells-sysfs")
    monkeypatch.setenv("SYSFS_ROOT", str(shells_tree))
    models = {"MODELS_DIR": str(tmp_path / "models")}

    with appliance_serve("--demo-models", env=models, log_dir=tmp_path) as server:
        watchdog = server.get_json("/info")["watchdog"]
    assert server.sysfs_root is not None and server.sysfs_root != shells_tree
    assert watchdog["reason"] == f"TELEMETRY_SOURCE=sysfs: reading {server.sysfs_root}"

    # An env naming either variable takes telemetry out of the harness's hands (a benchmark's
    # --env TELEMETRY_SOURCE=auto must read the host): the other one is the shell's again.
    sysfs = {**models, "TELEMETRY_SOURCE": "sysfs"}
    with appliance_serve("--demo-models", env=sysfs, log_dir=tmp_path) as server:
        watchdog = server.get_json("/info")["watchdog"]
    assert server.sysfs_root is None
    assert watchdog["reason"] == f"TELEMETRY_SOURCE=sysfs: reading {shells_tree}"

    # calm_telemetry=False leaves the environment as it is.
    with (
        pytest.raises(ServeFailed) as failed,
        appliance_serve("--demo-models", env=models, log_dir=tmp_path, calm_telemetry=False),
    ):
        pass
    assert f"TELEMETRY_SOURCE must be one of auto, jtop, sysfs, got '{bogus}'" in str(failed.value)
