"""A test HTTPS upstream (``api.example.test``): answers every request with what it received.

Run as ``python -m tests.plugins.upstream_server ADDR PORT CERT KEY LOG`` inside the namespace a
test made; each request is also appended to LOG as one JSON line, so a test can prove what
reached the upstream (and that nothing did). Prints ``ready`` once it listens.
"""

from __future__ import annotations

import http.server
import json
import ssl
import sys
from typing import Any


class Echo(http.server.BaseHTTPRequestHandler):
    log_path = ""

    def _reply(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        seen: dict[str, Any] = {
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": body.decode(errors="replace"),
        }
        with open(self.log_path, "a") as log:
            log.write(json.dumps(seen) + "\n")
        out = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _reply

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    addr, port, cert, key, log = sys.argv[1:6]
    Echo.log_path = log
    server = http.server.ThreadingHTTPServer((addr, int(port)), Echo)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
