"""The reference classifier as an HTTP ``ext_authz`` service. Stdlib only.

Run: ``python3 -m controlplane.boundary.classifyd --listen unix:/run/avm-classifier/classifier.sock``
(or ``--listen 127.0.0.1:PORT``). It prints ``ready`` once it listens. The gateway's
``ext_authz`` filter sends it each inspected request: the original method and path under
``/verdict``, the buffered body (``Content-Length``), and no header of the agent's. Whatever it
is asked, it answers ``200`` with the verdict (``classify.Verdict.to_dict``) as JSON and as
three headers the gateway acts on::

    x-avm-sensitivity: public|internal|confidential|restricted
    x-avm-findings: card,email          (the kinds, sorted; "-" for none)
    x-avm-classifier: avm-reference@1

It never allows or denies: the gateway compares the sensitivity with the destination's ceiling.
A request it cannot read (no ``Content-Length``, a body over ``--max-bytes``) gets 400, which
the gateway treats as a denial. Nothing is logged: not the body, not a finding's text.
``--delay-s`` holds every answer (to measure or test the gateway's timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import socket
import socketserver
import sys
import time
from pathlib import Path
from typing import Any

from controlplane.boundary.classify import classify

MAX_BYTES = 1 << 20
# what a host needs to run it with a bare python3 (namespace packages: no __init__ is copied)
SOURCES = (
    "controlplane/governance/secretscan.py",
    "controlplane/boundary/classify.py",
    "controlplane/boundary/classifyd.py",
)


def sources() -> dict[str, bytes]:
    """``SOURCES`` -> their bytes, from this installed package (what a host install copies)."""
    root = Path(__file__).resolve().parents[2]
    return {rel: (root / rel).read_bytes() for rel in SOURCES}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    max_bytes = MAX_BYTES
    delay_s = 0.0

    def _answer(self) -> None:
        length = self.headers.get("content-length")
        if self.headers.get("transfer-encoding") or (length is not None and not length.isdigit()):
            return self._refuse("a body with a Content-Length")
        n = int(length or 0)
        if n > self.max_bytes:
            return self._refuse(f"a body of at most {self.max_bytes} bytes")
        verdict = classify(self.rfile.read(n) if n else b"")
        if self.delay_s:
            time.sleep(self.delay_s)
        out = json.dumps(verdict.to_dict(), sort_keys=True).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.send_header("x-avm-sensitivity", verdict.sensitivity)
        self.send_header("x-avm-findings", ",".join(verdict.kinds) or "-")
        self.send_header("x-avm-classifier", verdict.classifier)
        self.end_headers()
        self.wfile.write(out)

    def _refuse(self, expected: str) -> None:
        out = json.dumps({"error": "unreadable-request", "expected": expected}).encode()
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(out)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def address_string(self) -> str:
        return "-"

    def log_message(self, *args: Any) -> None:
        pass


class _UnixHandler(Handler):
    disable_nagle_algorithm = False  # TCP_NODELAY is a TCP option


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def server(listen: str, mode: int = 0o660) -> socketserver.BaseServer:
    """A server on ``unix:/path`` (made ``mode``, a stale socket replaced) or ``ADDR:PORT``."""
    if listen.startswith("unix:"):
        path = listen[5:]
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o777 & ~mode)
        try:
            return _UnixServer(path, _UnixHandler)
        finally:
            os.umask(old)
    addr, _, port = listen.rpartition(":")
    return http.server.ThreadingHTTPServer((addr, int(port)), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="classifyd", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="unix:/path or ADDR:PORT")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    Handler.max_bytes, Handler.delay_s = args.max_bytes, args.delay_s
    srv = server(args.listen)
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
