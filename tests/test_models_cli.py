"""`appliance models list | fetch | verify` as an operator runs them, against a local server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from appliance.cli import main
from appliance.commands.models import ProgressDisplay, format_progress, format_table
from tests.test_store import PAYLOAD, PAYLOAD_MD5, PAYLOAD_SHA256, FileServer

BAD_MD5 = "0" * 32


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The command configures structlog process-wide; later tests expect it as they left it.
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def models_dir(tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model directory whose override file points three models at the local server."""
    server.routes["/good.onnx"] = server.file()
    directory = tmp_path / "models"
    directory.mkdir()
    override = {
        "good_det": {
            "family": "scrfd",
            "file": "good_det.onnx",
            "url": server.url("/good.onnx"),
            "checksum": f"md5:{PAYLOAD_MD5}",
        },
        "bad_rec": {
            "family": "arcface",
            "file": "bad_rec.onnx",
            "url": server.url("/good.onnx"),
            "checksum": f"md5:{BAD_MD5}",
        },
        "loose_rec": {"family": "arcface", "url": server.url("/good.onnx")},
    }
    (directory / "models.override.json").write_text(json.dumps(override))
    # Settings come from the environment: keep the developer's own out of the test.
    for name in (
        "APPLIANCE_CONFIG",
        "MODELS_OVERRIDE",
        "TRUST_UNVERIFIED",
        "DET_MODEL",
        "REC_MODEL",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODELS_DIR", str(directory))
    return directory


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["models", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fetch_downloads_verifies_and_prints_sha256(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "fetch", "good_det")

    assert code == 0
    assert out == (
        f"good_det: verified md5:{PAYLOAD_MD5} sha256:{PAYLOAD_SHA256} "
        f"{models_dir / 'good_det.onnx'} (downloaded)\n"
    )
    # Not a terminal, and 300 kB arrive in one 1 MiB read: one progress line, the last.
    assert err.startswith("fetching good_det: 100.0%     0.3 of     0.3 MB")
    assert err.count("\n") == 1
    assert (models_dir / "good_det.onnx").read_bytes() == PAYLOAD

    code, out, _ = run_cli(capsys, "fetch", "good_det")
    assert code == 0
    assert out.endswith("(already in place)\n")


def test_fetch_mismatch_exits_1_and_leaves_nothing(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "fetch", "bad_rec", "good_det")

    assert code == 1
    assert "bad_rec: failed: checksum mismatch for bad_rec" in err
    assert f"expected md5:{BAD_MD5}, got md5:{PAYLOAD_MD5}" in err
    # The failure does not stop the next model.
    assert out.startswith("good_det: verified")
    assert sorted(p.name for p in models_dir.iterdir()) == ["good_det.onnx", "models.override.json"]


def test_fetch_unverified_needs_trust_flag(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "fetch", "loose_rec")
    assert code == 1
    assert "loose_rec: failed: model loose_rec has no published checksum" in err
    assert not (models_dir / "loose_rec.onnx").exists()

    code, out, _ = run_cli(capsys, "fetch", "loose_rec", "--trust-unverified")
    assert code == 0
    assert out.startswith(
        f'loose_rec: present-unverified (no checksum in the registry; pin "checksum": "sha256:{PAYLOAD_SHA256}")'
    )


def test_fetch_all_defaults_uses_configured_models(
    models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DET_MODEL", "good_det")
    monkeypatch.setenv("REC_MODEL", "loose_rec")
    monkeypatch.setenv("TRUST_UNVERIFIED", "1")

    code, out, _ = run_cli(capsys, "fetch", "--all-defaults")

    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == ["good_det", "loose_rec"]


def test_fetch_usage_errors_exit_2(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "fetch")
    assert code == 2
    assert "--all-defaults" in err

    code, _, err = run_cli(capsys, "fetch", "good_det", "nope")
    assert code == 2
    assert "unknown model 'nope'" in err
    # The unknown name is caught before any download starts.
    assert not (models_dir / "good_det.onnx").exists()


def test_config_error_exits_2_with_its_message(
    models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORT", "0")

    code, out, err = run_cli(capsys, "list")

    assert code == 2
    assert out == ""
    assert err == "appliance models: PORT must be within 1..65535, got 0\n"


def test_bad_override_file_exits_2(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (models_dir / "models.override.json").write_text('{"x": {"family": "yolo"}}')

    code, _, err = run_cli(capsys, "list")

    assert code == 2
    assert "family must be one of" in err


@pytest.mark.parametrize(
    ("det", "rec", "message"),
    [
        ("scrfd_10g_gnkps", "glintr_typo", "unknown model 'glintr_typo'; known models: "),
        ("good_det", "good_det", "REC_MODEL an arcface model; got good_det (scrfd) and good_det"),
    ],
)
def test_list_refuses_settings_that_select_an_unknown_or_wrong_model(
    models_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    det: str,
    rec: str,
    message: str,
) -> None:
    """The appliance role's pre-switch check: a release whose settings name a model its
    registry (with the override) lacks, or of the wrong family, must not be switched to."""
    monkeypatch.setenv("DET_MODEL", det)
    monkeypatch.setenv("REC_MODEL", rec)

    code, out, err = run_cli(capsys, "list", "--quick")

    assert code == 2
    assert out == ""
    assert err.startswith("appliance models: ") and message in err


def test_list_shows_state_and_checksum_of_each_model(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (models_dir / "good_det.onnx").write_bytes(PAYLOAD)
    (models_dir / "bad_rec.onnx").write_bytes(PAYLOAD)

    code, out, _ = run_cli(capsys, "list")

    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    header = ["NAME", "FAMILY", "FILE", "STATE", "CHECKSUM", "SELECTED"]
    assert out.splitlines()[0].split() == header
    assert rows["good_det"] == [
        "good_det",
        "scrfd",
        "good_det.onnx",
        "verified",
        f"md5:{PAYLOAD_MD5}",
    ]
    assert rows["bad_rec"][3:] == ["checksum-mismatch", f"md5:{BAD_MD5}"]
    assert rows["loose_rec"][3:] == ["missing", "-"]
    assert rows["glintr100"] == [  # the default REC_MODEL
        "glintr100",
        "arcface",
        "glintr100.onnx",
        "missing",
        "md5:3b366b98f786426f79629ddb2e56629c",
        "REC_MODEL",
    ]
    assert rows["scrfd_10g_gnkps"][-1] == "DET_MODEL"
    assert out.splitlines()[-1] == f"model directory: {models_dir}"

    code, out, _ = run_cli(capsys, "list", "--quick")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert rows["bad_rec"][3] == "present"


def test_verify_prints_sha256_and_exit_code_follows_the_files(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (models_dir / "good_det.onnx").write_bytes(PAYLOAD)

    code, out, _ = run_cli(capsys, "verify", "good_det")
    assert code == 0
    assert out == (
        f"good_det: verified md5:{PAYLOAD_MD5} sha256:{PAYLOAD_SHA256} "
        f"{models_dir / 'good_det.onnx'}\n"
    )

    (models_dir / "bad_rec.onnx").write_bytes(PAYLOAD)
    code, out, _ = run_cli(capsys, "verify", "good_det", "bad_rec")
    assert code == 1
    assert out.splitlines()[1] == (
        f"bad_rec: checksum-mismatch: expected md5:{BAD_MD5}, got md5:{PAYLOAD_MD5} "
        f"sha256:{PAYLOAD_SHA256} {models_dir / 'bad_rec.onnx'}"
    )

    code, out, _ = run_cli(capsys, "verify", "loose_rec")
    assert code == 1
    assert out == f"loose_rec: missing: {models_dir / 'loose_rec.onnx'}\n"


def test_verify_without_names_checks_configured_and_present_models(
    models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DET_MODEL", "good_det")
    monkeypatch.setenv("REC_MODEL", "loose_rec")
    (models_dir / "good_det.onnx").write_bytes(PAYLOAD)
    (models_dir / "glintr100.onnx").write_bytes(b"x")

    code, out, _ = run_cli(capsys, "verify")

    assert code == 1
    states = [line.split(": ")[:2] for line in out.splitlines()]
    assert [s[0] for s in states] == ["good_det", "loose_rec", "glintr100"]
    assert states[1][1] == "missing"
    assert states[2][1].startswith("checksum-mismatch")


def test_format_progress_shows_percent_size_and_rate() -> None:
    assert format_progress("m", 1_500_000, 3_000_000, 2_500_000.0) == (
        "fetching m:  50.0%     1.5 of     3.0 MB     2.5 MB/s"
    )
    assert format_progress("m", 1_500_000, None, None) == "fetching m:     1.5 MB"


def test_progress_display_rate_excludes_resumed_bytes_and_throttles() -> None:
    now = [100.0]
    out = io.StringIO()
    display = ProgressDisplay("m", out, interval_s=5.0, clock=lambda: now[0])

    display(1_000_000, 4_000_000)  # resumed from 1 MB: first call
    now[0] = 101.0
    display(2_000_000, 4_000_000)  # within the interval: not shown
    now[0] = 106.0
    display(3_000_000, 4_000_000)
    now[0] = 107.0
    display(4_000_000, 4_000_000)  # the end is always shown

    assert out.getvalue().splitlines() == [
        "fetching m:  25.0%     1.0 of     4.0 MB",
        "fetching m:  75.0%     3.0 of     4.0 MB     0.3 MB/s",
        "fetching m: 100.0%     4.0 of     4.0 MB     0.4 MB/s",
    ]


def test_format_table_aligns_columns() -> None:
    assert format_table([("A", "BB", "C"), ("aaa", "b", "c")]) == "A    BB  C\naaa  b   c"


def test_subprocess_fetch_then_verify(models_dir: Path, server: FileServer) -> None:
    env = {**os.environ, "MODELS_DIR": str(models_dir)}
    command = [sys.executable, "-m", "appliance.cli", "models"]

    fetched = subprocess.run(
        [*command, "fetch", "good_det"], capture_output=True, text=True, env=env, timeout=120
    )
    verified = subprocess.run(
        [*command, "verify", "good_det", "bad_rec"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )

    assert fetched.returncode == 0, fetched.stderr
    assert f"sha256:{PAYLOAD_SHA256}" in fetched.stdout
    assert verified.returncode == 1
    assert verified.stdout.splitlines() == [
        f"good_det: verified md5:{PAYLOAD_MD5} sha256:{PAYLOAD_SHA256} {models_dir / 'good_det.onnx'}",
        f"bad_rec: missing: {models_dir / 'bad_rec.onnx'}",
    ]
    assert [s.path for s in server.seen] == ["/good.onnx"]


def test_list_marks_the_demo_pair_as_selected_in_demo_mode(
    models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo pair replaces DET_MODEL/REC_MODEL: an unknown name there is not what runs.
    monkeypatch.setenv("DEMO_MODELS", "1")
    monkeypatch.setenv("REC_MODEL", "glintr_typo")

    code, out, _ = run_cli(capsys, "list", "--quick")

    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert rows["demo_scrfd"][-1] == "DET_MODEL"
    assert rows["demo_arcface"][-1] == "REC_MODEL"
    assert rows["glintr100"][-1] != "REC_MODEL"
