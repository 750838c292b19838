"""`appliance serve` as a user runs it: a real process on a free loopback port.

The one harness for the tests and the benchmarks that need the command itself rather than
the app in-process (benchmarks import it from here, as they import tests.helpers).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Enough of the log to show why a start failed (a traceback, the models paragraph) without
# burying the assertion under a long start-up.
OUTPUT_TAIL_CHARS = 8000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeFailed(RuntimeError):
    """The server exited or never became ready; the message ends with what it printed."""

    def __init__(self, what: str, returncode: int | None, output: str) -> None:
        super().__init__(f"{what}; its output:\n{output[-OUTPUT_TAIL_CHARS:]}")
        self.returncode = returncode
        self.output = output


@dataclass
class ServedProcess:
    proc: subprocess.Popen[bytes]
    port: int
    # stdout and stderr interleaved as written, kept after the process ends.
    log: Path
    # /health/ready's answer once it said ready.
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/stream"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get_json(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(f"{self.base}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())


@contextlib.contextmanager
def appliance_serve(
    *args: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 60,
    stop_timeout: float = 30,
    cwd: Path | None = None,
) -> Iterator[ServedProcess]:
    """`appliance serve *args` with os.environ plus `env`, on 127.0.0.1 and a free port.

    Yields once /health/ready answers 200; raises ServeFailed, with the output, if the process
    exits first or `ready_timeout` passes. On the way out, whatever happened, SIGTERM (the
    graceful shutdown under test elsewhere), then SIGKILL after `stop_timeout` seconds.
    """
    port = free_port()
    # A file, not a pipe: nobody reads a pipe while the server runs, and a chatty server
    # (INFO logs under load) would block on a full one. Named apart from the port: a test
    # that restarts the server in one directory may be given the same port again.
    with tempfile.NamedTemporaryFile(
        dir=log_dir, prefix=f"appliance-serve-{port}-", suffix=".log", delete=False
    ) as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", *args],
            env={**os.environ, **(env or {}), "HOST": "127.0.0.1", "PORT": str(port)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
    served = ServedProcess(proc, port, Path(out.name))
    try:
        served.ready = wait_ready(served, ready_timeout)
        yield served
    finally:
        stop(proc, stop_timeout)


def wait_ready(served: ServedProcess, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        if served.proc.poll() is not None:
            rc = served.proc.returncode
            raise ServeFailed(f"appliance serve exited with {rc} at start", rc, served.output())
        try:
            ready: dict[str, Any] = served.get_json("/health/ready", timeout=1)
            return ready
        except OSError:  # not listening yet, or 503 while it loads
            if time.monotonic() > deadline:
                what = f"appliance serve was not ready within {timeout} s"
                raise ServeFailed(what, None, served.output()) from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
