"""kill -9 during enrolment: WAL recovery keeps every acknowledged face and a sound file."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

from appliance.gallery import Gallery, Recognizer

REC = Recognizer("mobilefacenet_128", "a" * 64)

# Enrols faces for ever; prints "ACK face_id seed" once add_faces has returned (acknowledged).
ENROLLER = """
import sys
import numpy as np
from pathlib import Path
from appliance.gallery import Gallery, NewFace, Recognizer
g = Gallery(Path(sys.argv[1]), Recognizer("mobilefacenet_128", "a" * 64))
i = 0
while True:
    v = np.random.default_rng(i).standard_normal(128).astype(np.float32)
    (fid,) = g.add_faces(f"s{i % 50}", [NewFace(v)], create=True)
    print("ACK", fid, i, flush=True)
    i += 1
"""


def test_kill_9_during_enrolment_keeps_every_acknowledged_face(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", ENROLLER, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.stdout is not None
    acknowledged: dict[int, int] = {}
    try:
        for line in proc.stdout:
            if not line.startswith("ACK "):
                continue  # the gallery's log lines
            _, fid, seed = line.split()
            acknowledged[int(fid)] = int(seed)
            if len(acknowledged) == 300:
                # Killed while it is in the middle of its next enrolments.
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    # Lines already in the pipe were acknowledged too.
    for line in proc.stdout:
        if line.startswith("ACK "):
            _, fid, seed = line.split()
            acknowledged[int(fid)] = int(seed)
    assert proc.returncode == -signal.SIGKILL
    assert Path(str(db) + "-wal").exists(), "killed before a checkpoint: recovery reads the WAL"

    g = Gallery(db, REC)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0] for r in con.execute("SELECT id FROM faces")}
    assert set(acknowledged) <= stored
    for fid, seed in acknowledged.items():
        v = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
        assert g.identify(v)[0].matches[0].face_id == fid
