"""Molecule scenarios over sandbox hosts (DESIGN.md section 7), run as CI runs them.

`molecule test` boots sandbox hosts (debootstrap root, network namespace, systemd as PID 1),
runs the site playbook with --check --diff, converges it, checks idempotence, verifies from
inside and from the controller, and destroys them. The docker scenario runs the whole
docker_network role on hosts with Docker 28, 28.0.1 (pin) and docker.io planted as on JetPack
6.2; the negative scenario checks preflight accepts 6.2.1 and refuses 6.1, JetPack 5 and
non-Jetson hosts, and that the docker_network decision picks the right fix per case.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SANDBOX = REPO / "molecule" / "sandbox" / "sandbox.sh"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Sandbox names, addresses and molecule's ephemeral directory are per machine: two test
# sessions on one machine (a developer's and an editor's full run) take turns through this lock.
LOCK = Path(os.environ.get("APPLIANCE_SANDBOX_STATE", "/run/appliance-sandbox") + ".lock")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "sandbox hosts need root (network namespaces, chroot)"
    if (
        shutil.which("ip") is None
        or subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode
    ):
        return "`ip netns` is not available"
    if (
        shutil.which("debootstrap") is None
        and shutil.which("debootstrap", path="/usr/sbin") is None
    ):
        return "debootstrap is not installed (see requirements-apt.txt)"
    if not (VENV_BIN / "molecule").exists():
        return f"molecule is not installed in {VENV_BIN} (pip install -r requirements-ansible.txt)"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]


def _molecule(
    scenario: str,
    tmp_path: Path,
    platforms: list[tuple[str, int]],
    extra_env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run `molecule test -s scenario`, then assert its hosts left nothing behind."""
    env = dict(os.environ)
    env.update(extra_env or {})
    env["PATH"] = (
        f"{VENV_BIN}{os.pathsep}/usr/sbin{os.pathsep}/sbin{os.pathsep}{env.get('PATH', '')}"
    )
    env.update(
        {
            "ANSIBLE_NOCOLOR": "1",
            "NO_COLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "PY_COLORS": "0",
            "COLUMNS": "400",
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        }
    )
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = None
        try:
            proc = _run_molecule(scenario, env, "test")
        finally:
            if proc is None or proc.returncode != 0:
                # molecule destroys after a failed step itself; this covers a run that was
                # killed (timeout) or crashed before its destroy step.
                _run_molecule(scenario, env, "destroy")
                for name, _ in platforms:
                    subprocess.run([str(SANDBOX), "destroy", name], check=False, timeout=120)
        _assert_nothing_left(platforms)
    assert proc is not None
    (tmp_path / f"molecule-{scenario}.log").write_text(proc.stdout)
    return proc.returncode, proc.stdout


def _run_molecule(
    scenario: str, env: dict[str, str], command: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "molecule"), command, "-s", scenario],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=840,
        check=False,
    )


def _flat(output: str) -> str:
    """Output without colours, box drawing and line wrapping, for substring checks."""
    text = ANSI.sub("", output).replace("│", " ")
    return " ".join(text.split())


def _assert_nothing_left(platforms: list[tuple[str, int]]) -> None:
    for name, index in platforms:
        subprocess.run([str(SANDBOX), "assert-clean", name, str(index)], check=True)


def _idempotence_recaps(output: str, scenario: str) -> dict[str, str]:
    plain = ANSI.sub("", output)
    second = plain[plain.index(f"[{scenario} > idempotence] Executing") :]
    second = second[: second.index(f"[{scenario} > idempotence] Executed")]
    return dict(re.findall(r"^([a-z0-9-]+)\s+: ok=\d+\s+changed=(\d+)", second, re.MULTILINE))


@pytest.mark.timeout(900)
def test_default_scenario_converges_idempotently_and_verifies(tmp_path: Path) -> None:
    rc, output = _molecule("default", tmp_path, [("jetson-a", 21), ("jetson-b", 22)])
    flat = _flat(output)
    assert rc == 0, output[-6000:]
    steps = ("create", "prepare", "check", "converge", "idempotence", "verify", "destroy")
    for step in steps:
        assert re.search(rf"default (?:>|➜) {step}: Executed: Successful", flat), step
    # The second converge (idempotence) ran on both hosts and changed nothing.
    assert _idempotence_recaps(output, "default") == {"jetson-a": "0", "jetson-b": "0"}
    assert "docker_network case 'no_docker'" in flat
    # JetPack 6.2 (R36 REVISION 4.3) passes preflight.
    assert "jetson-a: L4T R36 REVISION 4.3 (/etc/nv_tegra_release, JetPack 6.2)" in flat
    # jetson-stats' service finds no Jetson hardware in the sandbox: reported, not hidden.
    assert re.search(r"jtop\.service is not running on jetson-a \(ActiveState=", flat), flat[-3000:]
    assert "jtop: user sandbox-ghost does not exist on jetson-a; not added to jtop" in flat


@pytest.mark.timeout(900)
def test_docker_scenario_applies_the_right_fix_for_each_docker(tmp_path: Path) -> None:
    hosts = [("docker28", 61), ("docker28-pin", 62), ("dockerio", 63), ("docker28-halfdone", 64)]
    rc, output = _molecule("docker", tmp_path, hosts)
    flat = _flat(output)
    assert rc == 0, output[-6000:]
    for step in ("create", "prepare", "converge", "idempotence", "verify", "destroy"):
        assert re.search(rf"docker (?:>|➜) {step}: Executed: Successful", flat), step
    assert _idempotence_recaps(output, "docker") == {name: "0" for name, _ in hosts}
    # The epoch-carrying version string is read as 28.0.4, docker.io is recognised.
    for host, decision in (
        ("docker28", "'raw_table_missing_optout': docker-ce 28.0.4 needs the raw table"),
        ("docker28-pin", "'raw_table_missing_pin': docker-ce 28.0.1 needs the raw table"),
        ("dockerio", "'raw_table_missing_optout': docker.io 28.2.2 needs the raw table"),
    ):
        assert f'ok: [{host}] => {{ "msg": "docker_network case {decision}' in flat, host
    # The port filter holds whether it starts before or after dockerd, across a Docker restart,
    # without being restarted itself; a filter that fails to start says why (status, journal).
    assert (
        "FILTER-ORDER-OK filter before dockerd: ok; after dockerd started: ok; "
        "after dockerd restarted: ok"
    ) in flat, flat[-3000:]
    assert re.search(
        r"FILTER-FAILURE-REPORTED appliance-port-filter\.service could not be restarted: .*"
        r"status=3.*sandbox-planted-filter-failure",
        flat,
    ), flat[-3000:]
    # The half-done host: its drop-in was unchanged, the daemon was restarted all the same.
    assert re.search(
        r"TASK \[docker_network : Restart Docker because the running daemon does not have the "
        r"opt-out as configured\] \**\s*(?:skipping: \[[a-z0-9-]+\]\s*)*changed: \[docker28-halfdone\]",
        flat,
    ), flat[-3000:]


@pytest.mark.timeout(900)
def test_negative_scenario_refuses_wrong_hosts_and_decides_fixes(tmp_path: Path) -> None:
    hosts = [
        ("jetpack5", 31),
        ("not-a-jetson", 32),
        ("jetpack621", 65),
        ("jetpack61", 66),
        ("bad-override", 67),
    ]
    # Releases 1.0.0 and 2.0.0 for bad-override: the same code with another version string;
    # the dependency wheels are cached, so only the appliance wheel is built each time.
    wheelhouses = tmp_path / "wheelhouses"
    for version in ("1.0.0", "2.0.0"):
        built = subprocess.run(
            [str(REPO / "tools" / "build-wheelhouse.sh"), str(wheelhouses / version), version],
            env={**os.environ, "PYTHON": sys.executable},
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert built.returncode == 0, f"build-wheelhouse.sh {version}: {built.stderr[-3000:]}"
    rc, output = _molecule(
        "negative", tmp_path, hosts, {"APPLIANCE_NEGATIVE_WHEELHOUSES": str(wheelhouses)}
    )
    flat = _flat(output)
    assert rc == 0, output[-6000:]
    # Issue 10, defect 10: the second run found its sources unchanged and apt without their
    # packages, refreshed and installed them (the first failed in `apt-get update`).
    assert "APT-REFRESHED containerd.io|ii |1.7.27-1" in flat, flat[-3000:]
    assert "docker-ce|ii |5:28.0.4-1~debian.12~bookworm" in flat
    assert "nvidia-container-toolkit|ii |1.17.8-1 docker.service active" in flat
    # A model override release 2.0.0 refuses: the stage fails with its CLI's message, before
    # the switch; 1.0.0 serves on with the same process and answers ready.
    assert (
        "OVERRIDE-REFUSED appliance 2.0.0 refuses its model overrides (appliance_models_override): "
        "appliance models: override for 'mobilefacenet_128': unknown keys ['dynamic_batch']"
    ) in flat, flat[-3000:]
    assert re.search(
        r"OLD-RELEASE-SERVING current /opt/appliance/releases/1\.0\.0; service active pid \d+; "
        r"release 2\.0\.0 override absent",
        flat,
    ), flat[-3000:]
    assert "PREFLIGHT-ACCEPTED jetpack621: R36 REVISION 4.4 (JetPack 6.2.1)" in flat
    assert (
        "NEGATIVE-PREFLIGHT jetpack61: Preflight failed on jetpack61: L4T release: found R36 "
        "REVISION 4.0 (from /etc/nv_tegra_release, JetPack 6.1), required R36 with REVISION >= 4.3"
    ) in flat
    assert (
        "NEGATIVE-PREFLIGHT jetpack5: Preflight failed on jetpack5: L4T release: found R35 "
        "REVISION 4.1 (from /etc/nv_tegra_release, JetPack 5), required R36 with REVISION >= 4.3"
    ) in flat
    assert (
        "NEGATIVE-PREFLIGHT not-a-jetson: Preflight failed on not-a-jetson: L4T release: found "
        "none (no /etc/nv_tegra_release and no nvidia-l4t-core package: not a Jetson)"
    ) in flat
    assert "Skipping jtop on not-a-jetson" in flat
    assert (
        "CIDR-VALIDATION-OK docker_network_allowed_cidrs: 10.213.0.1/16 has host bits set" in flat
    )
    for case in (
        "raw_table_missing_optout no_iptables_raw,forward_policy_drop,kernel_modules,port_filter",
        "raw_table_missing_pin pin_docker,forward_policy_drop,kernel_modules,port_filter",
        "raw_table_present forward_policy_drop,kernel_modules,port_filter",
        "the appliance runs natively: raw_table_present kernel_modules,port_filter",
        "docker_before_28 ip_forward,forward_policy_drop,kernel_modules,port_filter",
        "no_docker kernel_modules,port_filter",
        "nft_broken iptables_legacy,forward_policy_drop,kernel_modules,port_filter",
    ):
        assert case in flat, case
