"""A bounded coverage-guided run of tests/fuzz_target.py in CI (`make fuzz` runs it longer).

libFuzzer starts from the kept corpus (tests/corpus/<target>, read only here) and writes what
it finds to a temporary directory; a contract violation or an allocation past its malloc
limit is a crash, saved under the artifact prefix and failing this test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNS = {"images": 15000, "urls": 10000}
# Without its dictionary libFuzzer took far longer to write 0xFFFFFFFF into a PNG chunk length.
DICTS = {"images": [f"-dict={REPO / 'tests' / 'corpus' / 'images.dict'}"]}

pytest.importorskip(
    "atheris", reason="atheris has no wheel for this platform/Python (see docs/RELIABILITY.md)"
)


@pytest.mark.parametrize("target", sorted(RUNS))
def test_fuzz_atheris_bounded_run_finds_no_crash(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = tmp_path / "found"
    found.mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz_target",
            f"-runs={RUNS[target]}",
            "-seed=12",
            "-timeout=20",
            f"-artifact_prefix={tmp_path}/",
            *DICTS.get(target, []),
            str(found),
            str(REPO / "tests" / "corpus" / target),
        ],
        cwd=REPO,
        env={**os.environ, "FUZZ_TARGET": target},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name != "found")
    assert proc.returncode == 0 and not crashes, proc.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", proc.stderr)
    cov = re.search(r"DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", proc.stderr)
    assert done is not None and int(done.group(1)) == RUNS[target]
    assert cov is not None
    with capsys.disabled():
        print(
            f"\nfuzz atheris/{target}: {done.group(1)} inputs, failures 0, {elapsed:.1f} s, "
            f"coverage {cov.group(1)} edges, corpus {cov.group(3)}"
        )
