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

from pathlib import Path
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


PIN_CLUSTER = "avm-mcp-pin"
RULE_HEADER = "x-avm-mcp-rule"  # = mcppin.RULE_HEADER (that file imports nothing from avm)


def pin_rule(identity: str, key: str) -> str:
    return f"{identity}|{key}"


def pin_route(route: dict[str, Any], identity: str, key: str) -> dict[str, Any]:
    """An MCP server's route goes to the pinning service, naming the rule in a header Envoy sets
    (an agent's header of that name is overwritten)."""
    header = {"key": RULE_HEADER, "value": pin_rule(identity, key)}
    return {
        **route,
        "route": {**route["route"], "cluster": PIN_CLUSTER},
        "request_headers_to_add": [{"header": header, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }


def pin_config(
    listen: tuple[str, int],
    servers: list[tuple[str, Any, str]],
    trusted_ca: str,
    upstreams: dict[str, tuple[str, int]],
) -> dict[str, Any]:
    """The pinning service's config: rule -> the server to reach and the pins. ``servers``:
    (identity, NameRule with ``mcp``, policy generation)."""
    rules = {}
    for identity, rule, generation in servers:
        pinned = upstreams.get(rule.key)
        rules[pin_rule(identity, rule.key)] = {
            "host": rule.host,
            "port": rule.port,
            "connect": list(pinned) if pinned else None,
            "cafile": trusted_ca,
            "tools": {t.name: t.schema_sha256 for t in rule.mcp.tools},
            "policy": generation,
        }
    return {"listen": list(listen), "rules": dict(sorted(rules.items()))}


def pin_cluster(pin: tuple[str, int], uplink_netns: Path | None) -> dict[str, Any]:
    """The cluster of the pinning service (plain HTTP on a local address; it re-originates TLS)."""
    out: dict[str, Any] = {
        "@type": _T + "config.cluster.v3.Cluster",
        "name": PIN_CLUSTER,
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": PIN_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": pin[0], "port_value": pin[1]}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if uplink_netns is not None:  # made in the uplink namespace, as every upstream socket
        source = {"address": "0.0.0.0", "port_value": 0, "network_namespace_filepath": str(uplink_netns)}  # noqa: S104
        out["upstream_bind_config"] = {"source_address": source}
    return out
