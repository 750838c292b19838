"""tools/build-wheelhouse.sh reads pyproject.toml's dependencies on the controller's Python,
which may be 3.10 (no tomllib): tomli when installed, else its own reading of the array."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # the appliance depends on tomli below 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "build-wheelhouse.sh"


def _expected() -> list[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def _deps(python: str, extra_env: dict[str, str] | None = None) -> list[str]:
    env = {**os.environ, "PYTHON": python, **(extra_env or {})}
    out = subprocess.run(
        [str(SCRIPT), "--deps"], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_deps_with_tomllib() -> None:
    assert _deps(sys.executable) == _expected()


def test_deps_without_tomllib_or_tomli(tmp_path: Path) -> None:
    # Python 3.10 without tomli: both imports fail, the script reads the array itself.
    for name in ("tomllib", "tomli"):
        (tmp_path / f"{name}.py").write_text(f"raise ModuleNotFoundError('no {name} here')\n")
    assert _deps(sys.executable, {"PYTHONPATH": str(tmp_path)}) == _expected()


def _python310() -> str | None:
    found = shutil.which("python3.10")
    if found and subprocess.run([found, "-V"], capture_output=True, check=False).returncode == 0:
        return found
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))
    return candidates[-1] if candidates else None


@pytest.mark.skipif(_python310() is None, reason="no Python 3.10 on this machine")
def test_deps_on_python310() -> None:
    python = _python310()
    assert python is not None
    assert _deps(python) == _expected()
