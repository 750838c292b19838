"""A stand-in for `appliance serve` that misbehaves on purpose, for the harness's own tests.

    python tests/stub_server.py PID_FILE [--never-ready] [--ignore-sigterm]

Serves GET /health/ready on $HOST:$PORT as the appliance does: 200 {"status": "ready"}, or,
with --never-ready, 503 forever (a server stuck loading its models). With --ignore-sigterm it
prints that SIGTERM came and keeps serving (a graceful shutdown that never ends). Standard
library only, so it starts in well under a second on a loaded 2-core runner.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pid_file", type=Path)
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true")
    args = parser.parse_args()
    status = 503 if args.never_ready else 200

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "ready" if status == 200 else "loading"}).encode()
            self.send_response(status if self.path == "/health/ready" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    if args.ignore_sigterm:

        def ignore(signum: int, frame: FrameType | None) -> None:
            # Printed, not silently ignored: the test asserts that SIGTERM came before SIGKILL.
            print("stub_server: SIGTERM received, ignoring it", flush=True)

        signal.signal(signal.SIGTERM, ignore)
    # Written only once the handler is in place: a test that reads it may signal at once.
    args.pid_file.write_text(str(os.getpid()))
    server = ThreadingHTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler)
    print(f"stub_server: loading models on port {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
