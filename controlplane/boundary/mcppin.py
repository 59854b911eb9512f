"""The MCP pinning service: the response path of an MCP server, outside the agent (stdlib only).

    python3 mcppin.py CONFIG        (CONFIG: the gateway's mcp-pin.json; prints ``ready``)

With ``listen`` port 0 it binds a free port and prints ``ready ADDR:PORT`` (the host's job
gateway, ``controlplane.boundary.hostpin``, then writes that address into the config).

Envoy judges each request first (``controlplane.boundary.mcprules``), then sends an MCP server's
traffic here instead of to the server, with the header ``x-avm-mcp-rule: <identity>|<host:port>``
that Envoy sets itself (an agent's header of that name is overwritten). This service then:

- refuses a body that is not exactly one JSON object, or that repeats a key anywhere
  (``mcp-duplicate-key``: Envoy's MCP filter keeps the last ``name``, a server may keep the first);
- for ``tools/call``, asks the server for its current ``tools/list`` and refuses the call unless
  the tool's descriptor hashes to the pinned ``schema_sha256`` (``tool-schema-changed``,
  ``tool-not-served``);
- forwards the request over TLS to the server (verified against ``cafile``, SNI the host);
- for ``tools/list``, removes every tool that is not listed or does not hash to its pin, so the
  agent only ever sees pinned tools; a streamed (``text/event-stream``) list is refused.

A refusal is a JSON-RPC error with ``error.data.reason`` in a 403, with ``x-avm-pin: <reason>``
for the gateway's access log. Anything it cannot judge is refused: the service fails closed, and
when it is down Envoy gets no connection and the agent a 503 (nothing reaches the server).
The config is re-read when its file changes (the gateway rewrites it on every apply).

This file imports nothing from avm: it is installed on its own on a Tier-1 host (Debian python3).
``schema_sha256`` here is the one definition of a tool's pin (avm.yaml ``tools:``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RULE_HEADER = "x-avm-mcp-rule"
PIN_HEADER = "x-avm-pin"
REASONS = (
    "mcp-duplicate-key",
    "mcp-rule-unknown",
    "tool-not-served",
    "tool-schema-changed",
    "mcp-stream-unsupported",
    "mcp-upstream-failed",
)
_HOP = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "te", "upgrade"}
_MAX_BODY = 4 << 20


def canonical(doc: Any) -> bytes:
    """Keys sorted, no whitespace, UTF-8 (the bytes a tool's pin is the sha256 of)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def schema_sha256(tool: dict[str, Any]) -> str:
    """sha256 hex of a tool's descriptor ``{name, description, inputSchema}``."""
    descriptor = {k: tool.get(k) for k in ("name", "description", "inputSchema")}
    return hashlib.sha256(canonical(descriptor)).hexdigest()


class Refused(Exception):
    def __init__(self, reason: str, code: int = -32600) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise Refused("mcp-duplicate-key")
    return dict(pairs)


def strict_json(body: bytes) -> Any:
    """JSON with no repeated key at any depth. Raises ``Refused``."""
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates)
    except ValueError:
        raise Refused("mcp-body-invalid") from None


class Config:
    """The config file, re-read when it is replaced or its mtime or size changes."""

    def __init__(self, path: str) -> None:
        self.path, self.stamp = path, (0, 0, 0)
        self.doc: dict[str, Any] = {"rules": {}}
        self.lock = threading.Lock()
        self.current()

    def current(self) -> dict[str, Any]:
        st = os.stat(self.path)
        with self.lock:
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a file renamed over is a new inode
            if stamp != self.stamp:
                with open(self.path, "rb") as fh:
                    self.doc = json.loads(fh.read())
                self.stamp = stamp
            return self.doc


class Upstream:
    """One request to the MCP server, over TLS verified against the rule's CA bundle."""

    def __init__(self, rule: dict[str, Any]) -> None:
        self.rule = rule

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        rule = self.rule
        ctx = ssl.create_default_context(cafile=rule["cafile"])
        addr = tuple(rule["connect"]) if rule.get("connect") else (rule["host"], rule["port"])
        sock = socket.create_connection((addr[0], int(addr[1])), timeout=30)
        conn = http.client.HTTPSConnection(rule["host"], rule["port"], context=ctx, timeout=30)
        conn.sock = ctx.wrap_socket(sock, server_hostname=rule["host"])
        try:
            conn.request("POST", path, body=body, headers={**headers, "host": rule["host"]})
            resp = conn.getresponse()
            data = resp.read(_MAX_BODY + 1)
            if len(data) > _MAX_BODY:
                raise Refused("mcp-upstream-failed")
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()


def _pinned(tools: dict[str, str], tool: Any) -> bool:
    return isinstance(tool, dict) and tools.get(str(tool.get("name"))) == schema_sha256(tool)


def judge(
    rule: dict[str, Any], path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """One request of the agent, end to end. Raises ``Refused``."""
    req = strict_json(body)
    if not isinstance(req, dict):
        raise Refused("mcp-body-invalid")  # a batch, a bare value
    up = Upstream(rule)
    method = req.get("method")
    if method == "tools/call":
        params = req.get("params")
        if not isinstance(params, dict) or not isinstance(params.get("name"), str):
            raise Refused("mcp-body-invalid")
        name = params["name"]
        check = canonical({"jsonrpc": "2.0", "id": "avm-pin-check", "method": "tools/list"})
        status, rhead, rbody = up.post(path, check, headers)
        listed = _tools(status, rhead, rbody)
        served = [t for t in listed if isinstance(t, dict) and t.get("name") == name]
        if not served:
            raise Refused("tool-not-served", -32602)
        if not _pinned(rule["tools"], served[0]):
            raise Refused("tool-schema-changed", -32602)
    status, rhead, rbody = up.post(path, body, headers)
    if method == "tools/list" and status == 200:
        doc = strict_json(rbody) if rhead.get("content-type", "").startswith("application/json") else None
        if not isinstance(doc, dict) or not isinstance(doc.get("result"), dict):
            raise Refused("mcp-stream-unsupported")
        listed = doc["result"].get("tools")
        doc["result"]["tools"] = (
            [t for t in listed if _pinned(rule["tools"], t)] if isinstance(listed, list) else []
        )
        rbody = json.dumps(doc).encode()
    return status, rhead, rbody


def _tools(status: int, headers: dict[str, str], body: bytes) -> list[Any]:
    if status != 200 or not headers.get("content-type", "").startswith("application/json"):
        raise Refused("mcp-stream-unsupported" if status == 200 else "mcp-upstream-failed")
    doc = strict_json(body)
    result = doc.get("result") if isinstance(doc, dict) else None
    tools = result.get("tools") if isinstance(result, dict) else None
    if not isinstance(tools, list):
        raise Refused("mcp-upstream-failed")
    return tools


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    config: Config

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(min(n, _MAX_BODY + 1))
        rule = self.config.current()["rules"].get(self.headers.get(RULE_HEADER, ""))
        req_id: Any = None
        try:
            if rule is None:
                raise Refused("mcp-rule-unknown")
            if len(body) > _MAX_BODY:
                raise Refused("mcp-body-invalid")
            try:
                parsed = json.loads(body)
                req_id = parsed.get("id") if isinstance(parsed, dict) else None
            except ValueError:
                pass
            fwd = {k.lower(): v for k, v in self.headers.items() if k.lower() not in _HOP | {RULE_HEADER}}
            status, rhead, rbody = judge(rule, self.path, body, fwd)
        except Refused as no:
            self.refuse(rule, req_id, no, body)
            return
        except (OSError, http.client.HTTPException, ssl.SSLError):
            self.refuse(rule, req_id, Refused("mcp-upstream-failed"), body)
            return
        self.send_response(status)
        for key in ("content-type", "mcp-session-id"):
            if key in rhead:
                self.send_header(key, rhead[key])
        self.send_header("content-length", str(len(rbody)))
        self.end_headers()
        self.wfile.write(rbody)

    def refuse(self, rule: dict[str, Any] | None, req_id: Any, no: Refused, body: bytes) -> None:
        data: dict[str, Any] = {"denied": True, "reason": no.reason}
        if rule is not None:
            data.update(destination=f"{rule['host']}:{rule['port']}", policy=rule.get("policy", ""))
        try:
            name = json.loads(body).get("params", {}).get("name")
            if isinstance(name, str):
                data["tool"] = name
        except (ValueError, AttributeError):
            pass
        message = f"refused at the boundary: {no.reason}"
        out = canonical(
            {"jsonrpc": "2.0", "id": req_id, "error": {"code": no.code, "message": message, "data": data}}
        )
        self.send_response(403)
        self.send_header("content-type", "application/json")
        self.send_header(PIN_HEADER, no.reason)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str]) -> None:
    Handler.config = Config(argv[0])
    addr, port = Handler.config.current()["listen"]
    server = ThreadingHTTPServer((addr, int(port)), Handler)
    print("ready" if int(port) else f"ready {addr}:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
