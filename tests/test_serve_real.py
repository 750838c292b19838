"""`appliance serve` as the issue's user runs it: the shared real models named by env vars."""

from __future__ import annotations

import json
from pathlib import Path

from tests.serve_process import appliance_serve


def test_serve_with_the_shared_real_models_reports_their_batch_and_embedding_size(
    real_models: Path, tmp_path: Path
) -> None:
    env = {
        "DET_MODEL": "scrfd_2.5g_bnkps",
        "REC_MODEL": "mobilefacenet_128",
        "MODELS_DIR": str(real_models),
        "ENGINES_DIR": str(tmp_path / "engines"),
        "LOG_FORMAT": "json",
    }
    with appliance_serve("--no-fetch", env=env, log_dir=tmp_path) as server:
        assert server.ready["status"] == "ready"
        info = server.get_json("/info")
    # The harness's calm tree: a hot or memory-tight runner cannot pause inference here.
    assert info["watchdog"]["reason"] == f"TELEMETRY_SOURCE=sysfs: reading {server.sysfs_root}"
    rec = info["models"]["recognizer"]
    # REC_BATCH_SIZE defaults to 4; the model's batch is fixed at 1 and cannot be rewritten.
    assert (rec["configured_batch"], rec["effective_batch"], rec["batch_mode"]) == (4, 1, "pieces")
    assert rec["embedding_size"] == 128
    events = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    planned = {e["model"]: e for e in events if e.get("event") == "model_batch_planned"}
    assert planned["mobilefacenet_128"]["effective_batch"] == 1
    assert planned["mobilefacenet_128"]["configured_batch"] == 4
    assert "scrfd_2.5g_bnkps" in planned
