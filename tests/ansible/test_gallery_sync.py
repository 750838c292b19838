"""The gallery_sync role against a real appliance on loopback (connection local): the first
run copies, verifies and imports the snapshot; the second changes nothing; a snapshot of
another recognizer fails the play with the appliance's reason."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from aiohttp import web

from appliance.api.app import create_app
from appliance.config import Settings

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    not (VENV_BIN / "ansible-playbook").exists(),
    reason=f"ansible-playbook is not installed in {VENV_BIN} (pip install -r requirements-ansible.txt)",
)


class Server:
    """The real app on 127.0.0.1 in a thread of its own (ansible-playbook is a subprocess)."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(create_app(settings))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(self.start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    async def start(self) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def servers(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(name: str, **overrides: Any) -> Server:
        server = Server(make_settings(gallery_db=tmp_path / f"{name}.db", **overrides))
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def play(
    tmp: Path, api: str, snapshot: Path, mode: str = "merge"
) -> subprocess.CompletedProcess[str]:
    playbook = tmp / "sync.yml"
    playbook.write_text(
        "- name: Sync\n  hosts: localhost\n  connection: local\n  gather_facts: false\n"
        "  roles:\n    - role: gallery_sync\n"
    )
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_ROLES_PATH=str(REPO / "roles"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCALHOST_WARNING="false",
    )
    extra = {
        "gallery_sync_snapshot": str(snapshot),
        "gallery_sync_api": api,
        "gallery_sync_dir": str(tmp / "device"),
        "gallery_sync_mode": mode,
        "ansible_python_interpreter": sys.executable,
    }
    return subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "-i",
            "localhost,",
            str(playbook),
            "-e",
            json.dumps(extra),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def http(url: str, body: Any = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:  # loopback only
        return int(resp.status), bytes(resp.read())


def recap(out: str) -> dict[str, int]:
    line = next(x for x in out.splitlines() if x.startswith("localhost") and "ok=" in x)
    return {k: int(v) for k, v in (p.split("=") for p in line.split(":", 1)[1].split())}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sync_imports_once_then_changes_nothing_and_refuses_another_recognizer(
    servers: Callable[..., Server], tmp_path: Path, models_dir: Path
) -> None:
    source = servers("source")
    rng = np.random.default_rng(3)
    for name in ("ada", "bob", "cy"):
        assert http(f"{source.url}/gallery/subjects", {"subject": name})[0] == 201
        vecs = rng.standard_normal((2, 512)).tolist()
        status, _ = http(f"{source.url}/gallery/subjects/{name}/faces", {"embeddings": vecs})
        assert status == 201
    snapshot = tmp_path / "gallery.zip"
    snapshot.write_bytes(http(f"{source.url}/gallery/export")[1])

    device = servers("device")
    first = play(tmp_path, device.url, snapshot)
    assert first.returncode == 0, first.stdout[-4000:]
    assert recap(first.stdout)["changed"] >= 2  # the copy and the import
    counts = json.loads(http(f"{device.url}/gallery/subjects")[1])
    assert (counts["total_subjects"], counts["total_faces"]) == (3, 6)

    second = play(tmp_path, device.url, snapshot)
    assert second.returncode == 0, second.stdout[-4000:]
    assert recap(second.stdout)["changed"] == 0, second.stdout[-4000:]

    # The same snapshot to an appliance whose recognizer is another file (another sha256).
    other_models = tmp_path / "other_models"
    shutil.copytree(models_dir, other_models)
    rec = onnx.load(str(other_models / "rec.onnx"))
    rec.doc_string = "another recognizer"
    onnx.save(rec, str(other_models / "rec.onnx"))
    other = servers("other", models_dir=other_models)
    refused = play(tmp_path, other.url, snapshot)
    assert refused.returncode != 0
    assert "recognizer_mismatch" in refused.stdout, refused.stdout[-4000:]
