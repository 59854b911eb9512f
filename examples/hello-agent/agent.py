"""hello-agent: a tiny Tier-1 agent gateway (stdlib only).

Serves GET /healthz on 127.0.0.1:$GATEWAY_PORT and reports which commit and profile it runs.
The commit is read from the release directory the code actually runs from
(/opt/agent/releases/<sha>), never from configuration, so health proves what is running.

Uses tools: GET /use?tool=NAME[&skip_guard=1] calls that tool on the MCP server $MCP_SERVER
(e.g. https://tools.example.test/mcp, the example server examples/mcp-tools/tools_server.py),
through the egress boundary: the name resolves to the profile's gateway listener, whose CA the
unit trusts (SSL_CERT_FILE), and the gateway decides which tools may be called. mcp_guard
checks the same allowlist first, in this process, as defence in depth; ``skip_guard=1`` skips
it, as a compromised agent would, to show that the boundary still refuses.

Serves MCP (JSON-RPC 2.0) on POST /mcp: initialize, tools/list, tools/call. Which tools exist
for callers is decided by mcp_guard from the policy avm wrote ($AGENT_POLICY), before the
socket is bound: an unreadable or invalid policy means the gateway does not start at all.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mcp_guard

RELEASE_DIR = Path(__file__).resolve().parent
COMMIT = RELEASE_DIR.name
PROFILE = os.environ.get("AGENT_PROFILE", "unknown")
GREETING = "hello"
MCP_SERVER = os.environ.get("MCP_SERVER", "")


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


def use_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One tools/call to $MCP_SERVER through the egress boundary: what came back, as is."""
    url = urllib.parse.urlsplit(MCP_SERVER)
    ctx = ssl.create_default_context()  # the unit's SSL_CERT_FILE: the egress CA bundle
    conn = http.client.HTTPSConnection(url.hostname or "", url.port or 443, context=ctx, timeout=15)
    msg = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }
    head = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    try:
        conn.request("POST", url.path or "/mcp", body=json.dumps(msg).encode(), headers=head)
        resp = conn.getresponse()
        raw = resp.read()
        is_json = (resp.getheader("content-type") or "").startswith("application/json")
        return {"tool": name, "status": resp.status, "answer": json.loads(raw) if is_json else None}
    except (OSError, ValueError) as exc:
        return {"tool": name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


class Handler(BaseHTTPRequestHandler):
    def use(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        name = (query.get("tool") or [""])[0]
        if not MCP_SERVER:
            out: dict[str, Any] = {"tool": name, "error": "no MCP_SERVER configured"}
        elif GUARD is not None and query.get("skip_guard") != ["1"] and name not in GUARD.allowed:
            GUARD.deny(name, "not-allowed")
            out = {"tool": name, "refused_by": "mcp_guard (in the agent)"}
        else:
            out = use_tool(name, {k: v[0] for k, v in query.items() if k not in ("tool", "skip_guard")})
        body = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/use?"):
            self.use()
            return
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

    def log_message(self, format: str, *args: object) -> None:
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
