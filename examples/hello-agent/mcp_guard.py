"""mcp_guard: fail-closed MCP tool allowlist for an agent gateway (stdlib only).

avm writes the profile's policy to /etc/agent/<profile>.policy.json (root-owned, read-only to
the service). The gateway calls ``launch()`` before it binds a socket:

- the policy cannot be read, is not JSON, has an unknown version or shape, or does not say
  ``"default": "deny"``  ->  the gateway refuses to serve (exit 78, EX_CONFIG); it never falls
  back to "allow everything";
- ``tools/list`` shows only tools that are allowed by name **and** whose descriptor hashes to
  the pinned ``schema_sha256``;
- ``tools/call`` of a tool that is not allowed, not implemented, or whose schema changed is an
  error (JSON-RPC -32602) and is logged as a structured ``tool.denied`` audit event.

A tool's schema hash is sha256 of its descriptor ``{name, description, inputSchema}`` as
canonical JSON (keys sorted, no whitespace, UTF-8): the same bytes avm's manifest pins.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from typing import Any

EX_CONFIG = 78
POLICY_VERSION = 1
EVENT_PREFIX = "avm-event "
_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
Emit = Callable[[dict[str, Any]], None]


class PolicyError(Exception):
    """The policy file is unreadable or invalid: the gateway must not serve."""


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def schema_sha256(tool: dict[str, Any]) -> str:
    descriptor = {k: tool[k] for k in ("name", "description", "inputSchema")}
    return hashlib.sha256(canonical(descriptor)).hexdigest()


def stderr_event(event: dict[str, Any]) -> None:
    """Audit events go to the journal as one line each: ``avm-event {json}``."""
    sys.stderr.write(EVENT_PREFIX + json.dumps(event, sort_keys=True) + "\n")
    sys.stderr.flush()


def load_policy(path: str) -> dict[str, str]:
    """Allowed tool name -> pinned schema sha256. Raises ``PolicyError`` for anything invalid."""
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except (OSError, ValueError) as exc:
        raise PolicyError(f"policy {path!r} is unreadable or not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != POLICY_VERSION:
        raise PolicyError(f"policy {path!r}: expected version {POLICY_VERSION}")
    tools = doc.get("tools")
    if (
        not isinstance(tools, dict)
        or tools.get("default") != "deny"
        or not isinstance(tools.get("allow"), list)
    ):
        raise PolicyError(f"policy {path!r}: tools must be {{default: deny, allow: [...]}}")
    allowed: dict[str, str] = {}
    for entry in tools["allow"]:
        if not isinstance(entry, dict) or set(entry) != {"name", "schema_sha256"}:
            raise PolicyError(f"policy {path!r}: each allowed tool is {{name, schema_sha256}}")
        name, digest = entry["name"], entry["schema_sha256"]
        if not (isinstance(name, str) and _NAME.fullmatch(name)) or not (
            isinstance(digest, str) and _HEX.fullmatch(digest)
        ):
            raise PolicyError(f"policy {path!r}: invalid tool entry")
        if name in allowed:
            raise PolicyError(f"policy {path!r}: tool {name} listed twice")
        allowed[name] = digest
    return allowed


class Guard:
    """Decides, per tool, whether the gateway may expose and call it."""

    def __init__(self, allowed: dict[str, str], tools: dict[str, dict[str, Any]], emit: Emit, profile: str):
        self.allowed, self.tools, self.emit, self.profile = allowed, tools, emit, profile

    def reason(self, name: str) -> str | None:
        """None if the tool may be served, else why not (a stable reason code)."""
        if name not in self.allowed:
            return "unknown-tool" if name not in self.tools else "not-allowed"
        if name not in self.tools:
            return "unknown-tool"
        if schema_sha256(self.tools[name]) != self.allowed[name]:
            return "schema-mismatch"
        return None

    def listed(self) -> list[dict[str, Any]]:
        return [self.tools[n] for n in sorted(self.tools) if self.reason(n) is None]

    def deny(self, name: str, reason: str) -> None:
        self.emit({"type": "tool.denied", "profile": self.profile, "tool": name, "reason": reason})


def launch(
    policy_path: str, tools: dict[str, dict[str, Any]], *, profile: str, emit: Emit = stderr_event
) -> Guard:
    """The launcher hook: a valid policy gives a ``Guard``; anything else exits 78 before serving."""
    try:
        allowed = load_policy(policy_path)
    except PolicyError as exc:
        emit({"type": "gateway.refused", "profile": profile, "reason": str(exc)})
        raise SystemExit(EX_CONFIG) from None
    guard = Guard(allowed, tools, emit, profile)
    for name in sorted(allowed):
        why = guard.reason(name)
        if why is not None:
            guard.deny(name, why)  # pinned in the policy, but not served as pinned
    return guard


def _error(req_id: Any, code: int, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": req_id, "error": err}


def handle(guard: Guard, request: Any, call: Callable[[str, dict[str, Any]], str]) -> dict[str, Any] | None:
    """One JSON-RPC 2.0 message in, one response out (None for notifications)."""
    if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or "method" not in request:
        return _error(None, -32600, "invalid request")
    req_id, method, params = request.get("id"), request["method"], request.get("params") or {}
    if "id" not in request:
        return None  # a notification, e.g. notifications/initialized
    if method == "initialize":
        result: dict[str, Any] = {
            "protocolVersion": "2025-03-26",
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "hello-agent", "version": "1"},
        }
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": guard.listed()}
    elif method == "tools/call":
        name = params.get("name") if isinstance(params, dict) else None
        why = guard.reason(name) if isinstance(name, str) else "unknown-tool"
        if why is not None:
            guard.deny(str(name), why)
            return _error(req_id, -32602, f"tool denied by policy: {why}", {"tool": name, "reason": why})
        text = call(str(name), dict(params.get("arguments") or {}))
        result = {"content": [{"type": "text", "text": text}], "isError": False}
    else:
        return _error(req_id, -32601, f"method not found: {method}")
    return {"jsonrpc": "2.0", "id": req_id, "result": result}
