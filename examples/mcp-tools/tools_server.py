"""A small MCP tool server (Streamable HTTP, JSON responses; stdlib only) for the example agent.

    python3 tools_server.py ADDR PORT [--tls CERT KEY] [--log FILE] [--tools FILE]

Serves JSON-RPC 2.0 on POST /mcp: ``initialize``, ``ping``, ``tools/list``, ``tools/call``
(notifications get 202). It serves three tools, one of which (``delete_records``) no example
profile lists: the boundary refuses calls to it, whatever the agent does. ``--tools FILE`` reads
the descriptors from a JSON list at every request instead, so a test (or an operator) can change
a descriptor under a running agent and see the boundary refuse it. ``--log FILE`` appends each
request as one JSON line (what reached the server). Prints ``ready`` once it listens.
"""

from __future__ import annotations

import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOOLS: list[dict[str, Any]] = [
    {
        "name": "search",
        "description": "Search the internal notes for a query.",
        "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
    {
        "name": "summarize",
        "description": "Summarize a text in one line.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    {
        "name": "delete_records",
        "description": "Delete records matching a filter (never allowed by the example manifest).",
        "inputSchema": {"type": "object", "properties": {"filter": {"type": "string"}}},
    },
]


class Server(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_file: Path | None = None
    tools_file: Path | None = None

    def tools(self) -> list[dict[str, Any]]:
        if self.tools_file is None:
            return TOOLS
        loaded: list[dict[str, Any]] = json.loads(self.tools_file.read_text())
        return loaded

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        if name == "search":
            return f"no notes match {arguments.get('query', '')!r}"
        if name == "summarize":
            return str(arguments.get("text", ""))[:60]
        return f"{name} ran"  # delete_records: the server would do it; the boundary must not let it

    def answer(self, req: Any) -> dict[str, Any] | None:
        if not isinstance(req, dict) or req.get("jsonrpc") != "2.0" or "method" not in req:
            return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "invalid request"}}
        if "id" not in req:
            return None
        method, params = req["method"], req.get("params") or {}
        result: dict[str, Any]
        if method == "initialize":
            result = {
                "protocolVersion": "2025-03-26",
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "example-tools", "version": "1"},
            }
        elif method == "ping":
            result = {}
        elif method == "tools/list":
            result = {"tools": self.tools()}
        elif method == "tools/call" and any(t["name"] == params.get("name") for t in self.tools()):
            text = self.call(str(params["name"]), dict(params.get("arguments") or {}))
            result = {"content": [{"type": "text", "text": text}], "isError": False}
        else:
            return {"jsonrpc": "2.0", "id": req["id"], "error": {"code": -32601, "message": f"no {method}"}}
        return {"jsonrpc": "2.0", "id": req["id"], "result": result}

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.log_file is not None:
            with self.log_file.open("a") as log:
                log.write(json.dumps({"path": self.path, "body": body.decode(errors="replace")}) + "\n")
        if self.path != "/mcp":
            self.reply(404, b"")
            return
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        out = self.answer(req)
        if out is None:
            self.reply(202, b"")
        else:
            self.reply(200, json.dumps(out).encode(), "application/json")

    def reply(self, status: int, body: bytes, ctype: str = "") -> None:
        self.send_response(status)
        if ctype:
            self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str]) -> None:
    addr, port, rest = argv[0], int(argv[1]), argv[2:]
    tls = None
    while rest:
        flag = rest.pop(0)
        if flag == "--tls":
            tls = (rest.pop(0), rest.pop(0))
        elif flag == "--log":
            Server.log_file = Path(rest.pop(0))
        elif flag == "--tools":
            Server.tools_file = Path(rest.pop(0))
        else:
            raise SystemExit(f"tools_server: unknown flag {flag}")
    server = ThreadingHTTPServer((addr, port), Server)
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
