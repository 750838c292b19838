"""The `appliance` command as a user runs it: a real process, a real port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from appliance.cli import main


@pytest.fixture(autouse=True)
def calm_telemetry(monkeypatch: pytest.MonkeyPatch, calm_sysfs: Path) -> None:
    """Servers started here inherit a calm tree, never the CI host's /sys (issue 12 defect 8)."""
    monkeypatch.setenv("TELEMETRY_SOURCE", "sysfs")
    monkeypatch.setenv("SYSFS_ROOT", str(calm_sysfs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def appliance(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def wait_ready(port: int, proc: subprocess.Popen[str], seconds: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as resp:
                return dict(json.loads(resp.read()))
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not become ready")


def test_serve_demo_models_works_offline(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MODELS_DIR": str(tmp_path / "models"),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", "--demo-models"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = wait_ready(port, proc)
        assert ready["status"] == "ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=5) as resp:
            info = json.loads(resp.read())
        assert info["models"]["detector"]["name"] == "demo_scrfd"
        assert (tmp_path / "models" / "demo_scrfd.onnx").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert "models_loaded" in (proc.stderr.read() if proc.stderr else "")


def test_serve_without_models_explains_what_to_do(tmp_path: Path) -> None:
    result = appliance(
        "serve", "--no-fetch", env={"MODELS_DIR": str(tmp_path), "PORT": str(free_port())}
    )
    assert result.returncode == 2
    assert "MODELS_DIR" in result.stderr
    assert "--demo-models" in result.stderr
    assert "scrfd_10g_gnkps" in result.stderr


def test_serve_fallback_demo_serves_anyway(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MODELS_DIR": str(tmp_path), "PORT": str(port), "HOST": "127.0.0.1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", "--no-fetch", "--fallback-demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_ready(port, proc)["status"] == "ready"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "--demo-models" in stderr and "Continuing with the demo models" in stderr


def test_invalid_setting_stops_start_with_the_variable_name(tmp_path: Path) -> None:
    result = appliance(
        "serve", "--demo-models", env={"DET_BATCH_SIZE": "lots", "MODELS_DIR": str(tmp_path)}
    )
    assert result.returncode == 2
    assert "DET_BATCH_SIZE must be an integer" in result.stderr


def test_settings_command_lists_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["settings", "--markdown"]) == 0
    out = capsys.readouterr().out
    for name in (
        "DET_MODEL",
        "MAX_SIZE",
        "BATCH_WINDOW_MS",
        "MAX_QUEUE",
        "TEMP_CRITICAL_C",
        "MAX_STREAMS",
    ):
        assert f"`{name}`" in out
    assert main(["settings", "--effective"]) == 0
    assert json.loads(capsys.readouterr().out)["port"] == 18080
