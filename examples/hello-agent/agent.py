"""hello-agent: a tiny Tier-1 agent gateway (stdlib only).

Serves GET /healthz on 127.0.0.1:$GATEWAY_PORT and reports which commit and profile it runs.
The commit is read from the release directory the code actually runs from
(/opt/agent/releases/<sha>), never from configuration, so health proves what is running.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RELEASE_DIR = Path(__file__).resolve().parent
COMMIT = RELEASE_DIR.name
PROFILE = os.environ.get("AGENT_PROFILE", "unknown")
GREETING = "hello"


def allowed_tools() -> list[str]:
    """The fail-closed tool allowlist avm wrote for this profile (no file: no tools)."""
    try:
        with open(os.environ.get("AGENT_POLICY", ""), encoding="utf-8") as fh:
            return list(json.load(fh)["tools"]["allow"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/healthz":
            self.send_error(404)
            return
        body = json.dumps(
            {
                "status": "ok",
                "commit": COMMIT,
                "profile": PROFILE,
                "greeting": GREETING,
                "tools": allowed_tools(),
                "credentials": sorted(os.listdir(os.environ["CREDENTIALS_DIRECTORY"]))
                if os.environ.get("CREDENTIALS_DIRECTORY")
                else [],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        sys.stderr.write("hello-agent: " + (format % args) + "\n")


def main() -> None:
    port = int(os.environ["GATEWAY_PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    sys.stderr.write(f"hello-agent {COMMIT[:12]} profile {PROFILE} on 127.0.0.1:{port}\n")
    server.serve_forever()


if __name__ == "__main__":
    main()
