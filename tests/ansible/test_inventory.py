"""The example inventory works for plays on the controller itself (issue 10, defect 10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    not (VENV_BIN / "ansible-playbook").exists(),
    reason=f"ansible-core is not installed in {VENV_BIN} (pip install -r requirements-ansible.txt)",
)


@pytest.mark.timeout(120)
def test_become_and_vault_variables_do_not_leak_to_the_implicit_localhost() -> None:
    # With ansible_become_password: "{{ vault_... }}" on `all`, this play fails on localhost
    # ("'vault_ansible_become_password' is undefined"): the vault file exists for jetsons only.
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "-i",
            "inventory/example",
            str(Path(__file__).parent / "playbooks" / "localhost_ping.yml"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "localhost                  : ok=1" in proc.stdout, proc.stdout[-4000:]


def test_become_is_set_for_the_jetsons_only() -> None:
    all_vars = (REPO / "inventory/example/group_vars/all.yml").read_text()
    jetson_vars = (REPO / "inventory/example/group_vars/jetsons/main.yml").read_text()
    assert "ansible_become" not in all_vars
    assert "ansible_become_password:" in jetson_vars
