"""The gallery_sync role against a real appliance on loopback (connection local): the first
run copies, verifies and imports the snapshot (with the appliance role's token); the second
changes nothing; a snapshot of another recognizer fails the play with the reason, before
anything is copied, on every run; a copy left by a run that failed before its import is
imported by the next run. The fleet scenario (tests/ansible/test_fleet.py) runs the playbook
on the sandbox hosts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pytest
from aiohttp import web

from appliance.api.app import create_app
from appliance.config import Settings
from tests.ansible.local_play import run_local_play

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
        server = cast(asyncio.Server, site._server)
        assert server is not None
        return int(server.sockets[0].getsockname()[1])

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
    tmp: Path, api: str, snapshot: Path, mode: str = "merge", **extra_vars: Any
) -> subprocess.CompletedProcess[str]:
    playbook = tmp / "sync.yml"
    playbook.write_text(
        "- name: Sync\n  hosts: localhost\n  connection: local\n  gather_facts: false\n"
        "  roles:\n    - role: gallery_sync\n"
    )
    extra = {
        "gallery_sync_snapshot": str(snapshot),
        "gallery_sync_api": api,
        "gallery_sync_dir": str(tmp / "device"),
        "gallery_sync_mode": mode,
        "ansible_python_interpreter": sys.executable,
        **extra_vars,
    }
    return run_local_play(playbook, extra, tmp, ANSIBLE_LOCALHOST_WARNING="false")


def http(url: str, body: Any = None, token: str = "") -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as resp:  # loopback only
        return int(resp.status), bytes(resp.read())


def recap(out: str) -> dict[str, int]:
    line = next(x for x in out.splitlines() if x.startswith("localhost") and "ok=" in x)
    return {k: int(v) for k, v in (p.split("=") for p in line.split(":", 1)[1].split())}


def enrol(url: str, names: tuple[str, ...], seed: int, token: str = "") -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        assert http(f"{url}/gallery/subjects", {"subject": name}, token)[0] == 201
        vecs = rng.standard_normal((2, 512)).tolist()
        status, _ = http(f"{url}/gallery/subjects/{name}/faces", {"embeddings": vecs}, token)
        assert status == 201


def gallery(url: str, token: str = "") -> tuple[int, int, list[str]]:
    page = json.loads(http(f"{url}/gallery/subjects", token=token)[1])
    return (
        page["total_subjects"],
        page["total_faces"],
        sorted(s["subject"] for s in page["subjects"]),
    )


@pytest.fixture
def snapshot(servers: Callable[..., Server], tmp_path: Path) -> Path:
    """Three subjects of two faces each, exported by a real appliance."""
    source = servers("source")
    enrol(source.url, ("ada", "bob", "cy"), seed=3)
    path = tmp_path / "gallery.zip"
    path.write_bytes(http(f"{source.url}/gallery/export")[1])
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sync_imports_once_then_changes_nothing_and_refuses_another_recognizer(
    servers: Callable[..., Server], tmp_path: Path, models_dir: Path, snapshot: Path
) -> None:
    # The device has API_TOKEN set; the role takes the appliance role's token by default.
    device = servers("device", api_token="device-token")
    first = play(tmp_path, device.url, snapshot, appliance_api_token="device-token")
    assert first.returncode == 0, first.stdout[-4000:]
    assert recap(first.stdout)["changed"] >= 3  # the copy, the import, the marker
    assert gallery(device.url, "device-token") == (3, 6, ["ada", "bob", "cy"])

    second = play(tmp_path, device.url, snapshot, appliance_api_token="device-token")
    assert second.returncode == 0, second.stdout[-4000:]
    assert recap(second.stdout)["changed"] == 0, second.stdout[-4000:]

    # The same snapshot to an appliance whose recognizer is another file (another sha256), which
    # holds as many subjects and faces of its own: refused before anything is copied, on the
    # second run too (the counts alone would have called it in sync), its gallery untouched.
    other_models = tmp_path / "other_models"
    shutil.copytree(models_dir, other_models)
    rec = onnx.load(str(other_models / "rec.onnx"))
    rec.doc_string = "another recognizer"
    onnx.save(rec, str(other_models / "rec.onnx"))
    other = servers("other", models_dir=other_models)
    enrol(other.url, ("dan", "eve", "fay"), seed=4)
    other_dir = tmp_path / "other-device"
    for _ in range(2):
        refused = play(tmp_path, other.url, snapshot, gallery_sync_dir=str(other_dir))
        assert refused.returncode != 0
        flat = " ".join(refused.stdout.replace("\\n", " ").split())
        assert "localhost: recognizer_mismatch: the snapshot gallery.zip was made with" in flat, (
            refused.stdout[-4000:]
        )
        assert "embeddings of different recognizers cannot be compared" in flat
        assert not (other_dir / "gallery-snapshot.zip").exists()
        assert gallery(other.url) == (3, 6, ["dan", "eve", "fay"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_copy_left_by_a_run_that_failed_before_its_import_is_imported_next_time(
    servers: Callable[..., Server], tmp_path: Path, snapshot: Path
) -> None:
    # A run copied the snapshot and stopped before the import (the service restarting, the
    # connection lost). The device holds as many subjects and faces of its own as the snapshot:
    # the unchanged copy and the counts alone would call it in sync; the import marker does not.
    device = servers("device")
    enrol(device.url, ("dan", "eve", "fay"), seed=4)
    (tmp_path / "device").mkdir()
    shutil.copy(snapshot, tmp_path / "device" / "gallery-snapshot.zip")
    (tmp_path / "device" / "gallery-snapshot.zip").chmod(0o640)  # as the role copies it
    first = play(tmp_path, device.url, snapshot)
    assert first.returncode == 0, first.stdout[-4000:]
    assert "TASK [gallery_sync : Import the snapshot through the API]" in first.stdout
    assert gallery(device.url) == (6, 12, ["ada", "bob", "cy", "dan", "eve", "fay"])
    assert (tmp_path / "device" / "imported").read_text().split() == [
        hashlib.sha256(snapshot.read_bytes()).hexdigest(),
        "merge",
    ]
    second = play(tmp_path, device.url, snapshot)
    assert recap(second.stdout)["changed"] == 0, second.stdout[-4000:]

    # Replace after merge: another mode is another import, then in sync again.
    replaced = play(tmp_path, device.url, snapshot, mode="replace")
    assert replaced.returncode == 0, replaced.stdout[-4000:]
    assert gallery(device.url) == (3, 6, ["ada", "bob", "cy"])
    again = play(tmp_path, device.url, snapshot, mode="replace")
    assert recap(again.stdout)["changed"] == 0, again.stdout[-4000:]
