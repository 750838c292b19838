"""`kill -9` during enrolment over HTTP: after a restart on the same GALLERY_DB every face the
server acknowledged is there and found by search (SQLite WAL recovery, fsync'd commits)."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import urllib.error
import urllib.request
import zipfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.serve_process import ServedProcess, appliance_serve


def post(port: int, path: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # loopback only
        return int(resp.status), json.loads(resp.read())


def serve(real_models: Path, tmp: Path) -> AbstractContextManager[ServedProcess]:
    """The real models on one gallery file, which outlives each server."""
    env = {
        "DET_MODEL": "scrfd_2.5g_bnkps",
        "REC_MODEL": "mobilefacenet_128",
        "MODELS_DIR": str(real_models),
        "ENGINES_DIR": str(tmp / "engines"),
        "GALLERY_DB": str(tmp / "gallery.db"),
        "LOG_FORMAT": "json",
        "INFERENCE_BACKEND": "onnx",
    }
    return appliance_serve("--no-fetch", env=env, log_dir=tmp)


@pytest.mark.slow
def test_every_acknowledged_face_survives_kill_9_during_enrolment(
    real_models: Path, tmp_path: Path
) -> None:
    acked: dict[int, list[float]] = {}
    stop = threading.Event()
    with serve(real_models, tmp_path) as server:
        assert server.ready["status"] == "ready"
        assert post(server.port, "/gallery/subjects", {"subject": "s"})[0] == 201
        rng = np.random.default_rng(11)

        def enrol() -> None:
            while not stop.is_set():
                vec = rng.standard_normal(128).tolist()
                try:
                    _, answer = post(
                        server.port, "/gallery/subjects/s/faces", {"embeddings": [vec]}
                    )
                except (urllib.error.URLError, ConnectionError, OSError):
                    return  # the server is gone: this face was never acknowledged
                acked[answer["face_ids"][0]] = vec

        writer = threading.Thread(target=enrol)
        writer.start()
        while len(acked) < 150 and writer.is_alive():
            writer.join(0.05)
        os.kill(server.proc.pid, signal.SIGKILL)  # mid-enrolment: a request is in flight
        server.proc.wait(timeout=30)
        stop.set()
        writer.join(30)
    assert len(acked) >= 150

    with serve(real_models, tmp_path) as server:
        assert server.ready["status"] == "ready"
        stored = {f["face_id"] for f in server.get_json("/gallery/subjects/s")["faces"]}
        assert set(acked) <= stored
        # At most the one in-flight face was committed without its answer reaching us.
        assert len(stored - set(acked)) <= 1
        # The stored embeddings are the acknowledged ones (read back through a snapshot).
        with urllib.request.urlopen(f"{server.base}/gallery/export", timeout=30) as r:
            snapshot = zipfile.ZipFile(io.BytesIO(r.read()))
    manifest = json.loads(snapshot.read("manifest.json"))
    vectors = np.frombuffer(snapshot.read("embeddings.f32"), np.float32).reshape(-1, 128)
    by_id = {face["id"]: vectors[i] for i, face in enumerate(manifest["faces"])}
    for face_id, vec in acked.items():
        want = np.asarray(vec, np.float32) / np.linalg.norm(vec)
        assert np.allclose(by_id[face_id], want, atol=1e-6), face_id
