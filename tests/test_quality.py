"""The house rules that CI enforces: mypy --strict and ruff on the package, tests and benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_mypy_strict_is_clean() -> None:
    result = run(str(BIN / "mypy"), "appliance")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("args", [("check",), ("format", "--check")])
def test_ruff_is_clean(args: tuple[str, ...]) -> None:
    result = run(str(BIN / "ruff"), *args, "appliance", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
