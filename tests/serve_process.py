"""`appliance serve` as a user runs it: a real process on a free loopback port.

The one harness for the tests and the benchmarks that need the command itself rather than
the app in-process (benchmarks import it from here, as they import tests.helpers).
`appliance_serve` starts the command; `serve_command` is the same for any argv that serves
/health/ready on $HOST:$PORT (the harness's own tests start misbehaving stand-ins with it).
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import write_calm_sysfs

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
    # What error messages call the process.
    name: str = "appliance serve"
    # The calm tree its watchdog reads (appliance_serve's default); None where it reads
    # whatever its environment names.
    sysfs_root: Path | None = None

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
    calm_telemetry: bool = True,
) -> Iterator[ServedProcess]:
    """`appliance serve *args` with os.environ plus `env`, on 127.0.0.1 and a free port.

    With `calm_telemetry` (the default) the watchdog reads a fresh calm sysfs tree under
    `log_dir` (TELEMETRY_SOURCE=sysfs), never the host's /sys and /proc/meminfo: a hot or
    memory-tight runner would otherwise pause inference for a reason unrelated to the test
    (issue 12 defect 8). That overrides TELEMETRY_SOURCE and SYSFS_ROOT exported in the shell,
    but not an `env` naming either of them (a benchmark's `--env TELEMETRY_SOURCE=auto` reads
    the host, SYSFS_ROOT included); `calm_telemetry=False` leaves both to os.environ.

    Otherwise as `serve_command`.
    """
    env = dict(env or {})
    telemetry: dict[str, str] = {}
    sysfs_root = None
    if calm_telemetry and not {"TELEMETRY_SOURCE", "SYSFS_ROOT"} & env.keys():
        # One tree per server: a second server in the same log_dir (a restart, a comparison)
        # must not rewrite files the first one's watchdog is reading.
        sysfs_root = write_calm_sysfs(Path(tempfile.mkdtemp(dir=log_dir, prefix="calm-sysfs-")))
        telemetry = {"TELEMETRY_SOURCE": "sysfs", "SYSFS_ROOT": str(sysfs_root)}
    with serve_command(
        [sys.executable, "-m", "appliance.cli", "serve", *args],
        name="appliance serve",
        log_dir=log_dir,
        env={**telemetry, **env},
        ready_timeout=ready_timeout,
        stop_timeout=stop_timeout,
        cwd=cwd,
    ) as served:
        served.sysfs_root = sysfs_root
        yield served


@contextlib.contextmanager
def serve_command(
    argv: Sequence[str],
    *,
    name: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 60,
    stop_timeout: float = 30,
    cwd: Path | None = None,
) -> Iterator[ServedProcess]:
    """Run `argv` with os.environ plus `env` plus HOST=127.0.0.1 and PORT=<a free port>.

    Yields once GET /health/ready answers 200; raises ServeFailed, with the output, if the
    process exits first or `ready_timeout` passes. On the way out, whatever happened, SIGTERM
    (the graceful shutdown under test elsewhere), then SIGKILL after `stop_timeout` seconds;
    the process is reaped before this returns.
    """
    port = free_port()
    # A file, not a pipe: nobody reads a pipe while the server runs, and a chatty server
    # (INFO logs under load) would block on a full one. Named apart from the port: a test
    # that restarts the server in one directory may be given the same port again.
    with tempfile.NamedTemporaryFile(
        dir=log_dir, prefix=f"serve-{port}-", suffix=".log", delete=False
    ) as out:
        proc = subprocess.Popen(
            list(argv),
            env={**os.environ, **(env or {}), "HOST": "127.0.0.1", "PORT": str(port)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
    served = ServedProcess(proc, port, Path(out.name), name=name)
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
            raise ServeFailed(f"{served.name} exited with {rc} at start", rc, served.output())
        try:
            ready: dict[str, Any] = served.get_json("/health/ready", timeout=1)
            return ready
        except OSError:  # not listening yet, or 503 while it loads
            if time.monotonic() > deadline:
                what = f"{served.name} was not ready within {timeout} s"
                raise ServeFailed(what, None, served.output()) from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; returns once the process is reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # ignored SIGTERM, or its shutdown hangs: killed below
    finally:
        # Past the grace, and also when the wait itself is interrupted (Ctrl-C, a pytest
        # timeout): no server is left running behind the test run.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
