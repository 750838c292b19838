"""Run a playbook against the controller itself (`-i localhost,`), with this repository's roles
and the test venv's Ansible first on PATH: for roles whose effects can be checked on the
controller (the container method's files, a gallery sync against a loopback appliance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def run_local_play(
    playbook: Path, extra_vars: dict[str, Any], cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """ansible-playbook on localhost; `env` adds to (or overrides) the base environment."""
    full = dict(os.environ)
    full.update(
        PATH=f"{VENV_BIN}{os.pathsep}{full.get('PATH', '')}",
        ANSIBLE_ROLES_PATH=str(REPO / "roles"),
        ANSIBLE_NOCOLOR="1",
        **env,
    )
    return subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "-i",
            "localhost,",
            str(playbook),
            "-e",
            json.dumps(extra_vars),
        ],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
