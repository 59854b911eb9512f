"""hello-agent: a tiny Tier-1 agent gateway (stdlib only).

Serves GET /healthz on 127.0.0.1:$GATEWAY_PORT and reports which commit and profile it runs.
The commit is read from the release directory the code actually runs from
(/opt/agent/releases/<sha>), never from configuration, so health proves what is running.

Serves MCP (JSON-RPC 2.0) on POST /mcp: initialize, tools/list, tools/call. Which tools exist
for callers is decided by mcp_guard from the policy avm wrote ($AGENT_POLICY), before the
socket is bound: an unreadable or invalid policy means the gateway does not start at all.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mcp_guard

RELEASE_DIR = Path(__file__).resolve().parent
COMMIT = RELEASE_DIR.name
PROFILE = os.environ.get("AGENT_PROFILE", "unknown")
GREETING = "hello"


TOOLS: dict[str, dict[str, Any]] = {
    "search": {
        "name": "search",
        "description": "Search the internal notes for a query.",
        "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
    "summarize": {
        "name": "summarize",
        "description": "Summarize a text in one line.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    "delete_records": {
        "name": "delete_records",
        "description": "Delete records matching a filter (never allowed by the example manifest).",
        "inputSchema": {"type": "object", "properties": {"filter": {"type": "string"}}},
    },
}
GUARD: mcp_guard.Guard | None = None


def call_tool(name: str, arguments: dict[str, Any]) -> str:
    if name == "search":
        return f"{GREETING}: no notes match {arguments.get('query', '')!r}"
    if name == "summarize":
        return str(arguments.get("text", ""))[:60]
    return f"{name} ran"


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
                "tools": [t["name"] for t in GUARD.listed()] if GUARD else [],
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

    def do_POST(self) -> None:
        if self.path != "/mcp" or GUARD is None:
            self.send_error(404)
            return
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        except ValueError:
            response: dict[str, Any] | None = {
                "jsonrpc": "2.0",
                "id": None,
                "error": {"code": -32700, "message": "parse error"},
            }
        else:
            response = mcp_guard.handle(GUARD, request, call_tool)
        if response is None:
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps(response).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        sys.stderr.write("hello-agent: " + (format % args) + "\n")


def main() -> None:
    global GUARD
    # the launcher hook: no valid policy, no gateway (exit 78 before any socket is bound)
    GUARD = mcp_guard.launch(os.environ.get("AGENT_POLICY", ""), TOOLS, profile=PROFILE)
    port = int(os.environ["GATEWAY_PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    sys.stderr.write(f"hello-agent {COMMIT[:12]} profile {PROFILE} on 127.0.0.1:{port}\n")
    server.serve_forever()


if __name__ == "__main__":
    main()
