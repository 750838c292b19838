"""The fleet rollout (playbooks/site.yml, roles/appliance, roles/engines) on sandbox hosts.

One molecule scenario (`molecule/fleet`: fleet-a the canary, then fleet-b and fleet-c one
at a time) is created once for the module; the tests are phases of one fleet's life, in order:
a first install that fails its health gate (no previous release), release 1 everywhere
(idempotent, verified inside and from the controller with the real models and t1.jpg), release
2 where the canary passes and fleet-b fails its gate, the rollback and engines playbooks, and a
release whose service dies at start. The appliance really runs under systemd in each host, from
a wheelhouse built here by tools/build-wheelhouse.sh.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml  # type: ignore[import-untyped]

from appliance.config import Settings, load_settings
from tests.ansible.test_gallery_sync import Server
from tests.ansible.test_molecule import LOCK, SANDBOX, _assert_nothing_left, _skip_reason
from tests.helpers import write_calm_sysfs

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SHARED = REPO.parent / "shared"
T1 = SHARED / "photos" / "t1.jpg"
GALLERY_PHOTOS = SHARED / "photos" / "gallery"  # obama (2), biden (2), alex_lacamoire (1)
PROBES = SHARED / "photos" / "probe"
HOSTS = {"fleet-a": 41, "fleet-b": 42, "fleet-c": 43}
TOKEN = "fleet-token-1"  # molecule/fleet/molecule.yml; fleet-b has none
HOST_ROLES = "preflight,container_runtime,docker_network,jtop"
SSH_KEY = Path(os.environ.get("APPLIANCE_SANDBOX_STATE", "/run/appliance-sandbox")) / "id_ed25519"


def _missing_data() -> str | None:
    for f in (
        "models/scrfd_2.5g_bnkps.onnx",
        "models/mobilefacenet_128.onnx",
        "photos/t1.jpg",
        "photos/gallery/obama",
        "photos/probe/obama_and_biden.jpg",
        "photos/probe/lin-manuel-miranda.png",
    ):
        if not (SHARED / f).exists():
            return f"{SHARED / f} is absent (see ../shared/DATA.md)"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
    pytest.mark.skipif(_missing_data() is not None, reason=str(_missing_data())),
]


class Fleet:
    """The scenario's hosts and how to run playbooks against them."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.inventory: Path | None = None
        self.durations: dict[str, float] = {}

    def molecule(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            [str(VENV_BIN / "molecule"), *args],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
            check=False,
        )
        (self.log_dir / f"molecule-{args[0]}.log").write_text(proc.stdout)
        if check:
            assert proc.returncode == 0, proc.stdout[-6000:]
        # molecule's own inventory of the scenario, for the playbooks run after converge.
        found = sorted(
            Path.home().glob(".ansible/tmp/molecule.*.fleet/inventory"),
            key=lambda p: p.stat().st_mtime,
        )
        if found:
            self.inventory = found[-1]
        return proc.stdout

    def playbook(self, name: str, phase: str, *args: str) -> tuple[int, str]:
        assert self.inventory is not None, "molecule converge has not run yet"
        start = time.monotonic()
        proc = subprocess.run(
            [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), name, *args],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
            check=False,
        )
        self.durations[phase] = time.monotonic() - start
        (self.log_dir / f"{phase}.log").write_text(proc.stdout)
        return proc.returncode, proc.stdout

    def ssh(self, host: str, command: str) -> str:
        proc = subprocess.run(
            [
                "ssh",
                "-q",
                "-i",
                str(SSH_KEY),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                f"root@10.213.{HOSTS[host]}.2",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return proc.stdout.strip()

    def release(self, host: str) -> tuple[str, dict[str, Any]]:
        """(`current` link target's release, the local facts) of a host."""
        link = self.ssh(host, "readlink /opt/appliance/current || true")
        facts = self.ssh(host, "cat /etc/ansible/facts.d/appliance.fact 2>/dev/null || echo {}")
        return link.rsplit("/", 1)[-1], json.loads(facts)

    def releases_installed(self, host: str) -> set[str]:
        return set(self.ssh(host, "ls /opt/appliance/releases 2>/dev/null || true").split())


def _http(host: str, path: str, token: str = "", body: bytes | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://10.213.{HOSTS[host]}.2:18080{path}", data=body, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError as exc:  # refused: nothing listens
        return 0, str(exc)


def _image_body(path: Path, **extra: Any) -> bytes:
    return json.dumps(
        {"images": {"data": [base64.b64encode(path.read_bytes()).decode()]}, **extra}
    ).encode()


def _fleet_vars() -> dict[str, Any]:
    scenario = yaml.safe_load((REPO / "molecule" / "fleet" / "molecule.yml").read_text())
    group_vars: dict[str, Any] = scenario["provisioner"]["inventory"]["group_vars"]["all"]
    return group_vars


def _controller_gallery(tmp: Path, name: str, recognizer_doc: str | None = None) -> Path:
    """A snapshot as an operator makes one: the appliance on the controller's loopback with the
    fleet's models and override (molecule.yml), the photos of ../shared/photos/gallery enrolled
    through the API, then GET /gallery/export. With `recognizer_doc` the recognizer is another
    file (the same network saved with another doc string: another sha256)."""
    fleet_vars = _fleet_vars()
    override = json.loads(json.dumps(fleet_vars["appliance_models_override"]))
    models = SHARED / "models"
    if recognizer_doc is not None:
        models = tmp / f"{name}-models"
        models.mkdir()
        (models / "scrfd_2.5g_bnkps.onnx").symlink_to(SHARED / "models" / "scrfd_2.5g_bnkps.onnx")
        rec = onnx.load(str(SHARED / "models" / "mobilefacenet_128.onnx"))
        rec.doc_string = recognizer_doc
        onnx.save(rec, str(models / "mobilefacenet_128.onnx"))
        digest = hashlib.sha256((models / "mobilefacenet_128.onnx").read_bytes()).hexdigest()
        override["mobilefacenet_128"]["checksum"] = f"sha256:{digest}"
    (tmp / f"{name}.override.json").write_text(json.dumps(override))
    settings: Settings = load_settings(
        env={},
        models_dir=models,
        models_override=tmp / f"{name}.override.json",
        det_model=fleet_vars["appliance_det_model"],
        rec_model=fleet_vars["appliance_rec_model"],
        det_batch_size=1,
        rec_batch_size=1,
        inference_backend="onnx",
        telemetry_source="sysfs",
        sysfs_root=write_calm_sysfs(tmp / f"{name}-sysfs"),
        gallery_db=tmp / f"{name}.db",
        log_format="json",
    )
    server = Server(settings)
    try:
        for subject in sorted(p for p in GALLERY_PHOTOS.iterdir() if p.is_dir()):
            body = json.dumps({"subject": subject.name}).encode()
            request = urllib.request.Request(
                f"{server.url}/gallery/subjects", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:  # loopback only
                assert response.status == 201
            images = [base64.b64encode(p.read_bytes()).decode() for p in sorted(subject.iterdir())]
            request = urllib.request.Request(
                f"{server.url}/gallery/subjects/{subject.name}/faces",
                json.dumps({"images": {"data": images}}).encode(),
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:  # loopback only
                assert len(json.load(response)["face_ids"]) == len(images), subject
        with urllib.request.urlopen(f"{server.url}/gallery/export", timeout=60) as response:
            data = response.read()
            assert hashlib.sha256(data).hexdigest() == response.headers["X-Snapshot-Sha256"]
    finally:
        server.close()
    snapshot = tmp / f"{name}.zip"
    snapshot.write_bytes(data)
    return snapshot


def _gallery_of(host: str) -> tuple[int, int, list[str]]:
    """(subjects, faces, subject names) of a host's gallery, through its API."""
    token = "" if host == "fleet-b" else TOKEN
    status, page = _http(host, "/gallery/subjects?limit=100", token)
    assert status == 200, page
    return (
        page["total_subjects"],
        page["total_faces"],
        sorted(s["subject"] for s in page["subjects"]),
    )


def _identities(host: str, probe: str) -> list[str | None]:
    token = "" if host == "fleet-b" else TOKEN
    status, answer = _http(host, "/gallery/search", token, _image_body(PROBES / probe, top_k=3))
    assert status == 200, answer
    return [face["identity"] for face in answer["data"][0]["faces"]]


def _main_pids(fleet: Fleet) -> dict[str, str]:
    """Each host's service: its main PID and when it last entered `active`."""
    return {
        host: fleet.ssh(
            host, "systemctl show appliance -p MainPID -p ActiveEnterTimestampMonotonic --value"
        )
        for host in HOSTS
    }


def _recaps(output: str) -> dict[str, dict[str, int]]:
    return {
        host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
        for host, rest in re.findall(r"^(fleet-[abc])\s+:(.*)$", output, re.MULTILINE)
    }


def _flat(output: str) -> str:
    return " ".join(output.replace("\\n", " ").split())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    log_dir = tmp_path_factory.mktemp("fleet")
    env = dict(os.environ)
    env["PATH"] = (
        f"{VENV_BIN}{os.pathsep}/usr/sbin{os.pathsep}/sbin{os.pathsep}{env.get('PATH', '')}"
    )
    wheelhouses = log_dir / "wheelhouses"
    # Release 2 and 3 are the same code with another version string. The dependency wheels are
    # cached (keyed by the dependency set), so only the appliance wheel is built each time.
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        built = subprocess.run(
            [str(REPO / "tools" / "build-wheelhouse.sh"), str(wheelhouses / version), version],
            env={**env, "PYTHON": sys.executable},
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert built.returncode == 0, f"build-wheelhouse.sh {version}: {built.stderr[-3000:]}"

    env.update(
        {
            "ANSIBLE_NOCOLOR": "1",
            "NO_COLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "PY_COLORS": "0",
            "COLUMNS": "400",
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "APPLIANCE_FLEET_WHEELHOUSES": str(wheelhouses),
        }
    )
    f = Fleet(env, log_dir)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            f.molecule("destroy", "-s", "fleet", check=False)
            start = time.monotonic()
            f.molecule("create", "-s", "fleet")
            f.molecule("prepare", "-s", "fleet")
            f.durations["create+prepare"] = time.monotonic() - start
            yield f
        finally:
            f.molecule("destroy", "-s", "fleet", check=False)
            for name in HOSTS:
                subprocess.run([str(SANDBOX), "destroy", name], check=False, timeout=120)
            _assert_nothing_left(list(HOSTS.items()))
            print("fleet phase durations (s):", {k: round(v) for k, v in f.durations.items()})


@pytest.mark.timeout(1500)
def test_first_install_that_fails_its_gate_is_stopped_and_reported(fleet: Fleet) -> None:
    # molecule converge once (host roles + release 1 on the canary would be the operator's
    # first run); here only fleet-c with limits that make it `critical`: no previous release.
    start = time.monotonic()
    output = fleet.molecule(
        "converge",
        "-s",
        "fleet",
        "--",
        "--limit",
        "fleet-c",
        "--skip-tags",
        HOST_ROLES,
        "-e",
        '{"fleet_critical_hosts": ["fleet-c"]}',
        check=False,
    )
    fleet.durations["first install fails"] = time.monotonic() - start
    flat = _flat(output)
    assert "ROLLOUT-FAILED fleet-c: release 1.0.0 failed" in flat, output[-4000:]
    assert "governor critical" in flat
    assert "no previous release to go back to (first install)" in flat
    assert _recaps(output)["fleet-c"]["failed"] == 1
    # Stopped, disabled, no `current`: nothing half-installed serves.
    assert fleet.ssh("fleet-c", "systemctl is-active appliance || true") in ("inactive", "failed")
    assert fleet.ssh("fleet-c", "systemctl is-enabled appliance || true") == "disabled"
    current_c, facts_c = fleet.release("fleet-c")
    assert (current_c, facts_c["current"]) == ("", "")
    assert _http("fleet-c", "/health/ready")[0] == 0


@pytest.mark.timeout(900)
def test_status_prints_a_row_for_every_host_failing_ones_included(fleet: Fleet) -> None:
    rc, output = fleet.playbook("playbooks/status.yml", "status with nothing serving")
    assert rc == 0, output[-4000:]
    rows = re.findall(r'"msg": "STATUS (fleet-[abc]) \| (.*)"', output)
    assert [h for h, _ in rows] == ["fleet-a", "fleet-b", "fleet-c"], output[-3000:]
    for _, row in rows:
        assert "release none" in row and "NOT READY: no answer" in row, row


@pytest.mark.timeout(1800)
def test_release_1_rolls_out_everywhere_idempotently_and_serves_the_real_models(
    fleet: Fleet,
) -> None:
    start = time.monotonic()
    first = fleet.molecule("converge", "-s", "fleet", "--", "-e", "site_serial=2")
    fleet.durations["release 1 (full site.yml, 3 hosts)"] = time.monotonic() - start
    assert "ENGINES-SKIPPED fleet-a: TensorRT is not importable by 1.0.0" in first
    assert all(r["failed"] == 0 for r in _recaps(first).values())
    start = time.monotonic()
    second = fleet.molecule("converge", "-s", "fleet", "--", "-e", "site_serial=2")
    fleet.durations["idempotence"] = time.monotonic() - start
    recaps = _recaps(second)
    assert set(recaps) == set(HOSTS), second[-3000:]
    assert {h: r["changed"] for h, r in recaps.items()} == dict.fromkeys(HOSTS, 0), second[-6000:]
    fleet.molecule("verify", "-s", "fleet")
    for host in HOSTS:
        assert fleet.release(host)[0] == "1.0.0"

    # From the controller, as a client would: the real SCRFD-2.5G + MobileFaceNet find the six
    # faces of t1.jpg; a token host refuses a request without it, the token-less host serves it.
    body = json.dumps({"images": {"data": [base64.b64encode(T1.read_bytes()).decode()]}}).encode()
    for host in HOSTS:
        token = "" if host == "fleet-b" else TOKEN
        status, answer = _http(host, "/extract", token, body)
        assert status == 200, answer
        faces = answer["data"][0]["faces"]
        assert len(faces) == 6, answer["data"][0]
        assert len(faces[0]["vec"]) == 128  # MobileFaceNet's embedding, not a demo model's
        if token:
            assert _http(host, "/extract", "", body)[0] == 401
            assert _http(host, "/extract", "wrong-token", body)[0] == 401
        status, info = _http(host, "/info", token)
        assert info["version"] == "1.0.0"
        assert info["models"]["detector"]["sha256"].startswith("bc24bb34")
        assert info["models"]["recognizer"]["sha256"].startswith("93fac2c9")


@pytest.mark.timeout(900)
def test_gallery_sync_pushes_one_gallery_to_the_running_fleet_once(
    fleet: Fleet, tmp_path: Path
) -> None:
    start = time.monotonic()
    snapshot = _controller_gallery(tmp_path, "controller")
    other = _controller_gallery(tmp_path, "other", recognizer_doc="another recognizer file")
    fleet.durations["gallery: two snapshots on the controller"] = time.monotonic() - start
    pids = _main_pids(fleet)
    assert all(p.split()[0] != "0" for p in pids.values()), pids
    assert {h: _gallery_of(h)[:2] for h in HOSTS} == dict.fromkeys(HOSTS, (0, 0))

    # As an operator runs it: the inventory's token per host (fleet-b has none), default serial.
    rc, output = fleet.playbook(
        "playbooks/gallery_sync.yml", "gallery sync", "-e", f"gallery_sync_snapshot={snapshot}"
    )
    assert rc == 0, output[-4000:]
    recaps = _recaps(output)
    assert set(recaps) == set(HOSTS), output[-3000:]
    assert all(r["changed"] >= 3 for r in recaps.values()), recaps  # copy, import, marker
    for host in HOSTS:
        assert f"{host}: gallery holds 3 subjects, 5 faces" in output, output[-3000:]
        assert _gallery_of(host) == (3, 5, ["alex_lacamoire", "biden", "obama"])
        # The fleet's recognizer answers with the controller's gallery: both known faces named,
        # the stranger not.
        assert {i for i in _identities(host, "obama_and_biden.jpg") if i} == {"obama", "biden"}
        assert set(_identities(host, "lin-manuel-miranda.png")) == {None}
        assert (
            fleet.ssh(host, "sha256sum /var/lib/appliance/gallery-sync/gallery-snapshot.zip")[:64]
            == hashlib.sha256(snapshot.read_bytes()).hexdigest()
        )

    rc, output = fleet.playbook(
        "playbooks/gallery_sync.yml",
        "gallery sync again",
        "-e",
        f"gallery_sync_snapshot={snapshot}",
    )
    assert rc == 0, output[-4000:]
    recaps = _recaps(output)
    assert {h: r["changed"] for h, r in recaps.items()} == dict.fromkeys(HOSTS, 0), output[-4000:]
    assert output.count("skipping: [fleet-") >= 3  # the import, on every host

    # A snapshot of another recognizer (same photos, same counts): every host refuses it with
    # the reason, before anything is copied; the galleries and the device copies stay as they are.
    rc, output = fleet.playbook(
        "playbooks/gallery_sync.yml",
        "gallery sync, another recognizer",
        "-e",
        f"gallery_sync_snapshot={other}",
        "-e",
        "gallery_sync_serial=3",
    )
    flat = _flat(output)
    assert rc != 0, output[-4000:]
    for host in HOSTS:
        assert (
            f"{host}: recognizer_mismatch: the snapshot other.zip was made with mobilefacenet_128"
        ) in flat, output[-4000:]
        assert "this appliance runs mobilefacenet_128 (sha256 93fac2c9747e...)" in flat
        assert "Nothing was copied or imported" in flat
        assert _recaps(output)[host]["failed"] == 1
        assert _gallery_of(host) == (3, 5, ["alex_lacamoire", "biden", "obama"])
        assert (
            fleet.ssh(host, "sha256sum /var/lib/appliance/gallery-sync/gallery-snapshot.zip")[:64]
            == hashlib.sha256(snapshot.read_bytes()).hexdigest()
        )
    # No run restarted the service anywhere.
    assert _main_pids(fleet) == pids
    fleet.durations["gallery sync (3 runs + checks)"] = time.monotonic() - start


@pytest.mark.timeout(1200)
def test_release_2_canary_passes_the_second_host_fails_and_is_rolled_back(fleet: Fleet) -> None:
    rc, output = fleet.playbook(
        "playbooks/site.yml",
        "release 2 (fleet-b fails its gate)",
        "--skip-tags",
        HOST_ROLES,
        "-e",
        "appliance_version=2.0.0",
        "-e",
        '{"fleet_critical_hosts": ["fleet-b"]}',
    )
    flat = _flat(output)
    assert rc != 0, output[-4000:]
    assert (
        "ROLLOUT-FAILED fleet-b: release 2.0.0 failed (Assert the appliance is ready: fleet-b: "
        "release 2.0.0 not ready after 60 s: HTTP 503, models loaded, governor critical"
    ) in flat, output[-4000:]
    assert "rolled back to 1.0.0, which is ready again" in flat
    recaps = _recaps(output)
    # fleet-c comes after the failed host: never touched, not even connected to.
    assert "fleet-c" not in recaps, output[-3000:]
    assert fleet.releases_installed("fleet-c") == {"1.0.0"}
    # The canary kept release 2; fleet-b is back on release 1, ready, and records why.
    current_a, facts_a = fleet.release("fleet-a")
    assert (current_a, facts_a["current"], facts_a["previous"]) == ("2.0.0", "2.0.0", "1.0.0")
    assert _http("fleet-a", "/info", TOKEN)[1]["version"] == "2.0.0"
    current_b, facts_b = fleet.release("fleet-b")
    assert (current_b, facts_b["current"], facts_b["previous"]) == ("1.0.0", "1.0.0", "2.0.0")
    assert _http("fleet-b", "/health/ready")[0] == 200
    assert _http("fleet-b", "/info")[1]["version"] == "1.0.0"
    # The synced gallery (GALLERY_DB in the data directory every release shares) outlives the
    # switch to release 2 and the rollback.
    for host in ("fleet-a", "fleet-b"):
        assert _gallery_of(host) == (3, 5, ["alex_lacamoire", "biden", "obama"])

    rc, output = fleet.playbook("playbooks/status.yml", "status after release 2")
    assert rc == 0, output[-3000:]
    rows = dict(re.findall(r'"msg": "STATUS (fleet-[abc]) \| (.*)"', output))
    assert rows["fleet-a"].startswith("release 2.0.0 (previous 1.0.0) | backend onnx"), rows
    assert (
        "models scrfd_2.5g_bnkps+mobilefacenet_128 | governor ok | max temp 45.0 C"
        in (rows["fleet-a"])
    )
    assert rows["fleet-b"].startswith("release 1.0.0 (previous 2.0.0)"), rows
    assert all("| READY |" in r for r in rows.values()), rows


@pytest.mark.timeout(900)
def test_rollback_and_engines_playbooks(fleet: Fleet) -> None:
    rc, output = fleet.playbook("playbooks/rollback.yml", "rollback by hand", "--limit", "fleet-a")
    assert rc == 0, output[-4000:]
    assert "ROLLBACK-OK fleet-a: 2.0.0 -> 1.0.0 (ready)" in output
    assert fleet.release("fleet-a")[0] == "1.0.0"
    assert _http("fleet-a", "/info", TOKEN)[1]["version"] == "1.0.0"

    rc, output = fleet.playbook("playbooks/engines.yml", "engines", "--limit", "fleet-a")
    assert rc == 0, output[-4000:]
    # TensorRT is absent here: the skip is said, not hidden, and the host is still ready.
    assert "ENGINES-SKIPPED fleet-a: TensorRT is not importable by 1.0.0" in output
    assert "fleet-a: ready, release 1.0.0" in output


@pytest.mark.timeout(900)
def test_release_whose_service_crashes_at_start_is_rolled_back(fleet: Fleet) -> None:
    rc, output = fleet.playbook(
        "playbooks/site.yml",
        "release 3 crashes",
        "--limit",
        "fleet-a",
        "--skip-tags",
        HOST_ROLES,
        "-e",
        "appliance_version=3.0.0",
        "-e",
        '{"fleet_crash_hosts": ["fleet-a"]}',
    )
    flat = _flat(output)
    assert rc != 0
    assert "ROLLOUT-FAILED fleet-a: release 3.0.0 failed" in flat, output[-4000:]
    assert "no answer on port 18080" in flat
    assert "rolled back to 1.0.0, which is ready again" in flat
    assert fleet.release("fleet-a")[0] == "1.0.0"
    assert _http("fleet-a", "/info", TOKEN)[1]["version"] == "1.0.0"
    # systemd kept restarting the crashing release (Restart=on-failure) until the rollback.
    assert (
        "address"
        in fleet.ssh(
            "fleet-a", "journalctl -u appliance --no-pager | grep -i -m1 'address' || true"
        ).lower()
    )


@pytest.mark.timeout(900)
def test_a_settings_and_token_change_alone_restarts_without_reinstalling(fleet: Fleet) -> None:
    pid_before = fleet.ssh("fleet-c", "systemctl show appliance -p MainPID --value")
    marker_before = fleet.ssh("fleet-c", "stat -c %Y /opt/appliance/releases/1.0.0/.installed")
    rc, output = fleet.playbook(
        "playbooks/site.yml",
        "settings and token change",
        "--limit",
        "fleet-c",
        "--tags",
        "appliance",
        "-e",
        "appliance_api_token=fleet-token-2",
        "-e",
        json.dumps(
            {
                "fleet_settings": {
                    "det_batch_size": 1,
                    "rec_batch_size": 1,
                    "inference_backend": "onnx",
                    "telemetry_source": "sysfs",
                    "watchdog_min_dwell_s": 1.0,
                    "det_threshold": 0.55,
                }
            }
        ),
    )
    assert rc == 0, output[-4000:]
    assert "fleet-token-2" not in output  # the secrets task has no_log
    assert "RUNNING HANDLER [appliance : Restart the appliance]" in output
    # Same release, not reinstalled: the venv install did not run, its marker is untouched.
    assert re.search(
        r"TASK \[appliance : Install the wheels by hash, with no index\] \*+\nskipping: \[fleet-c\]",
        output,
    ), output[-4000:]
    assert fleet.ssh("fleet-c", "stat -c %Y /opt/appliance/releases/1.0.0/.installed") == (
        marker_before
    )
    assert fleet.ssh("fleet-c", "systemctl show appliance -p MainPID --value") != pid_before
    status, info = _http("fleet-c", "/info", "fleet-token-2")
    assert status == 200 and info["settings"]["det_threshold"] == 0.55
    assert _http("fleet-c", "/info", TOKEN)[0] == 401
