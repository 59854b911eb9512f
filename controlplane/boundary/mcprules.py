"""An MCP server's tool allowlist as Envoy filters: ``envoy.filters.http.mcp`` + RBAC policies.

For a destination whose entry says ``mcp:``, the chain runs Envoy's MCP filter, which parses the
JSON-RPC body of each request into dynamic metadata (``method``, ``id``, ``params``), before the
chain's RBAC filter (``controlplane.boundary.routes``). These policies join it, each on top of
"listed host, path and method":

- ``mcp-body-invalid``: the MCP filter found no JSON-RPC request (not JSON, a batch, no method):
  a batch is refused whole, whatever its calls;
- ``mcp-method-not-allowed``: a JSON-RPC method outside ``METHODS`` (resources, prompts, ...);
- ``tool-not-allowed``: ``tools/call`` of a tool that is not listed.

A refusal is a JSON-RPC error (``error.data.reason``, the request's ``id`` echoed) in a 403.
Envoy marks the MCP filter's API work-in-progress: these rules are pinned to Envoy 1.40.0 and
tested against it (tests/test_boundary_mcp.py). Duplicate JSON keys are not refused by this
filter (it keeps the last ``name``, measured): the pinning service behind it refuses them
(``controlplane.boundary.mcptools``).
"""

from __future__ import annotations

from typing import Any

from controlplane.boundary.policy import McpServer

_T = "type.googleapis.com/envoy."
NS = "envoy.filters.http.mcp"
REASONS = ("mcp-body-invalid", "mcp-method-not-allowed", "tool-not-allowed")
# the JSON-RPC methods an agent may send its MCP server; notifications/* are one-way
METHODS = ("initialize", "ping", "tools/list", "tools/call")
_CODES = {
    "mcp-body-invalid": (-32600, "invalid JSON-RPC request: refused at the boundary"),
    "mcp-method-not-allowed": (-32601, "method not allowed at the boundary"),
    "tool-not-allowed": (-32602, "tool not allowed at the boundary"),
}


def mcp_filter() -> dict[str, Any]:
    return {"name": NS, "typed_config": {"@type": _T + "extensions.filters.http.mcp.v3.Mcp"}}


def _meta(path: tuple[str, ...], match: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"filter": NS, "path": [{"key": k} for k in path], "value": match}}


def _is(path: tuple[str, ...], value: str) -> dict[str, Any]:
    return _meta(path, {"string_match": {"exact": value}})


def _or(rules: list[dict[str, Any]]) -> dict[str, Any]:
    if not rules:
        return {"not_rule": {"any": True}}  # matches nothing
    return rules[0] if len(rules) == 1 else {"or_rules": {"rules": rules}}


def permissions(server: McpServer) -> dict[str, dict[str, Any]]:
    """Reason -> RBAC permission; each excludes the ones before it."""
    parsed = _meta(("method",), {"present_match": True})
    method_ok = _or(
        [_is(("method",), m) for m in METHODS]
        + [_meta(("method",), {"string_match": {"prefix": "notifications/"}})]
    )
    listed = _or([_is(("params", "name"), t.name) for t in server.tools])
    return {
        "mcp-body-invalid": {"not_rule": parsed},
        "mcp-method-not-allowed": {"and_rules": {"rules": [parsed, {"not_rule": method_ok}]}},
        "tool-not-allowed": {"and_rules": {"rules": [_is(("method",), "tools/call"), {"not_rule": listed}]}},
    }


def error_body(reason: str, denied: dict[str, Any]) -> dict[str, Any]:
    """The JSON-RPC error for ``reason``; ``denied`` is the egress deny body, kept as ``data``."""
    code, message = _CODES[reason]
    data = dict(denied)
    if reason == "tool-not-allowed":
        data["tool"] = f"%DYNAMIC_METADATA({NS}:params:name)%"
    elif reason == "mcp-method-not-allowed":
        data["method"] = f"%DYNAMIC_METADATA({NS}:method)%"
    return {
        "jsonrpc": "2.0",
        "id": f"%DYNAMIC_METADATA({NS}:id)%",
        "error": {"code": code, "message": message, "data": data},
    }
