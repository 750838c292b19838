"""ansible-lint's production profile is the bar for roles and playbooks (STYLE.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    not (VENV_BIN / "ansible-lint").exists(),
    reason=f"ansible-lint is not installed in {VENV_BIN} (pip install -r requirements-ansible.txt)",
)


@pytest.mark.timeout(600)
def test_roles_and_playbooks_pass_ansible_lint_production_profile() -> None:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["NO_COLOR"] = "1"
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible-lint"),
            "--profile",
            "production",
            "--offline",
            "roles",
            "playbooks",
            "molecule",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-8000:]


@pytest.mark.timeout(300)
def test_site_playbook_parses_against_the_example_inventory() -> None:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "--syntax-check",
            "-i",
            "inventory/example",
            "playbooks/site.yml",
            "playbooks/status.yml",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-8000:]
