"""The `appliance` command as a user runs it: a real process, a real port."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli import main
from tests.serve_process import ServeFailed, appliance_serve


def test_serve_demo_models_works_offline_and_says_so(tmp_path: Path) -> None:
    env = {"MODELS_DIR": str(tmp_path / "models"), "LOG_FORMAT": "json"}
    with appliance_serve("--demo-models", env=env, log_dir=tmp_path) as server:
        assert server.ready["status"] == "ready"
        assert server.get_json("/info")["models"]["detector"]["name"] == "demo_scrfd"
        assert (tmp_path / "models" / "demo_scrfd.onnx").is_file()
        # The harness's calm tree, not this host's /sys (issue 12 defect 8).
        watchdog = server.get_json("/info")["watchdog"]
        assert watchdog["reason"] == f"TELEMETRY_SOURCE=sysfs: reading {server.sysfs_root}"
    assert server.proc.returncode == 0  # SIGTERM is a clean shutdown
    # The demo paragraph is wrapped to the terminal: its words, not its line breaks.
    said = " ".join(server.output().split())
    assert "models_loaded" in said
    assert "DEMO models" in said and "planted test faces whatever the image" in said
    assert "scrfd_2.5g_bnkps.onnx and mobilefacenet_128.onnx" in said
    assert "DET_MODEL=scrfd_2.5g_bnkps REC_MODEL=mobilefacenet_128" in said


def test_serve_without_models_explains_what_to_do(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    with (
        pytest.raises(ServeFailed) as failed,
        appliance_serve("--no-fetch", env={"MODELS_DIR": str(models)}, log_dir=tmp_path),
    ):
        pass
    assert failed.value.returncode == 2
    # The harness's error carries what the server said.
    for words in ("MODELS_DIR", "--demo-models", "scrfd_10g_gnkps"):
        assert words in str(failed.value)


def test_serve_fallback_demo_serves_anyway(tmp_path: Path) -> None:
    env = {"MODELS_DIR": str(tmp_path / "models")}
    with appliance_serve("--no-fetch", "--fallback-demo", env=env, log_dir=tmp_path) as server:
        assert server.ready["status"] == "ready"
    output = server.output()
    assert "--demo-models" in output and "Continuing with the demo models" in output


def test_invalid_setting_stops_start_with_the_variable_name(tmp_path: Path) -> None:
    env = {"DET_BATCH_SIZE": "lots", "MODELS_DIR": str(tmp_path / "models")}
    with (
        pytest.raises(ServeFailed) as failed,
        appliance_serve("--demo-models", env=env, log_dir=tmp_path),
    ):
        pass
    assert failed.value.returncode == 2
    assert "DET_BATCH_SIZE must be an integer" in str(failed.value)


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
