"""How the gateway judges one request inside a listed name's filter chain: an Envoy RBAC filter.

The chain's single route sends everything to the name's cluster; the decision is the chain's
``envoy.filters.http.rbac`` filter (action DENY), whose policies are named by their reason and
exclude each other, so exactly one names a refused request:

- ``host-not-allowed``: the Host header is not the chain's name (a wildcard: one first label);
- ``path-not-allowed``: the right host, a path that is not listed (after Envoy normalised it);
- ``method-not-allowed``: a listed path with a method that is not listed;
- for an MCP server, the policies of ``controlplane.boundary.mcprules`` after those.

RBAC answers a denial with 403 and ``rbac_access_denied_matched_policy[<reason>]`` as its
response code details; one ``local_reply_config`` mapper per reason (a CEL filter on exactly
that detail) turns it into the JSON body an agent can read (``{"denied": true, "reason": ...,
"destination": "host:port", "policy": <generation>}``). RBAC's dynamic metadata (the matched
policy) is set only after the local reply is built, so the mappers cannot use it — measured on
Envoy 1.40 — but the access log can: it records the reason with the listener's identity and the
policy generation. No Python runs in the request path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from controlplane.boundary import mcprules
from controlplane.boundary.policy import NameRule

_T = "type.googleapis.com/envoy."
REASONS = ("host-not-allowed", "method-not-allowed", "path-not-allowed")
# the JSON line the access log writes per request; REQ_WITHOUT_QUERY keeps query strings
# (where clients sometimes put tokens) out of the log
LOG_FIELDS = (
    "t",
    "identity",
    "policy",
    "sni",
    "host",
    "method",
    "path",
    "code",
    "reason",
    "flags",
    "upstream",
    "sensitivity",
    "findings",
    "classifier",
    "rpc",
    "tool",
    "pin",
    "details",
    "bytes_sent",
    "bytes_received",
    "input_tokens",
    "output_tokens",
    "budget",
)
_DETAILS = "rbac_access_denied_matched_policy[{}]"


def cluster_name(rule: NameRule) -> str:
    return f"out|{rule.host}|{rule.port}"


def deny_body(
    reason: str, rule: NameRule, generation: str, ask: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The JSON body of a 403 for ``reason``: what the agent reads. ``ask``: how a refused agent
    asks for more (``request``) and reads its policy (``policy_at``), where the boundary answers
    them (Tier-1: ``boundary.api``)."""
    return {"denied": True, "reason": reason, "destination": rule.key, "policy": generation, **(ask or {})}


def routes(rule: NameRule, generation: str) -> list[dict[str, Any]]:
    """The chain's one route: judging is the RBAC filter's (``rbac_filter``), not the routes'."""
    return [
        {
            "match": {"prefix": "/"},
            "route": {"cluster": cluster_name(rule), "timeout": "60s"},
            "metadata": {"filter_metadata": {"avm": {"policy": generation}}},
        }
    ]


def _host(rule: NameRule) -> dict[str, Any]:
    if rule.wildcard:  # exactly one first label, as the policy promises (RE2 size: no (?i))
        regex = r"^[A-Za-z0-9-]+" + re.escape(rule.host[1:]) + "$"
        match: dict[str, Any] = {"safe_regex": {"regex": regex}}
    else:
        match = {"exact": rule.host, "ignore_case": True}
    return {"header": {"name": ":authority", "string_match": match}}


def _path(path: str) -> dict[str, Any]:
    if path == "/*":
        return {"url_path": {"path": {"prefix": "/"}}}
    if path.endswith("/*"):  # the prefix itself, or below it at a segment boundary
        base = path[:-2]
        return {
            "or_rules": {
                "rules": [
                    {"url_path": {"path": {"exact": base}}},
                    {"url_path": {"path": {"prefix": base + "/"}}},
                ]
            }
        }
    return {"url_path": {"path": {"exact": path}}}


def _any(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return rules[0] if len(rules) == 1 else {"or_rules": {"rules": rules}}


def _not(rule: dict[str, Any]) -> dict[str, Any]:
    return {"not_rule": rule}


def _all(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"and_rules": {"rules": list(rules)}}


def _policy(permission: dict[str, Any]) -> dict[str, Any]:
    return {"principals": [{"any": True}], "permissions": [permission]}


def rbac_policies(rule: NameRule) -> dict[str, dict[str, Any]]:
    """Reason -> RBAC policy. Each policy includes the negation of the ones before it."""
    host = _host(rule)
    path = _any([_path(p) for p in rule.paths])
    method = _any([{"header": {"name": ":method", "string_match": {"exact": m}}} for m in rule.methods])
    out = {
        "host-not-allowed": _policy(_not(host)),
        "path-not-allowed": _policy(_all(host, _not(path))),
        "method-not-allowed": _policy(_all(host, path, _not(method))),
    }
    if rule.mcp is not None:
        listed = _all(host, path, method)
        out.update({reason: _policy(_all(listed, p)) for reason, p in mcprules.permissions(rule.mcp).items()})
    return out


def rbac_filter(rule: NameRule) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _T + "extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": rbac_policies(rule)},
        },
    }


def reply_mapper(reason: str, body: dict[str, Any]) -> dict[str, Any]:
    """A local-reply mapper: the RBAC denial of policy ``reason`` answers 403 with ``body``."""
    cel = f"response.code_details == '{_DETAILS.format(reason)}'"
    return {
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    "@type": _T + "extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                    "expression": cel,
                },
            }
        },
        "status_code": 403,
        "body_format_override": {"json_format": body, "content_type": "application/json"},
    }


def local_replies(rule: NameRule, generation: str, ask: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The HCM ``local_reply_config``: one mapper per reason of ``rbac_policies``."""
    mappers = [reply_mapper(r, deny_body(r, rule, generation, ask)) for r in REASONS]
    if rule.mcp is not None:
        mappers += [
            reply_mapper(r, mcprules.error_body(r, deny_body(r, rule, generation, ask)))
            for r in mcprules.REASONS
        ]
    return {"mappers": mappers}


RBAC_REASON = "%DYNAMIC_METADATA(envoy.filters.http.rbac:enforced_effective_policy_id)%"
ROUTE_REASON = "%METADATA(ROUTE:avm:reason)%"  # a listener that answers by routes (boundary.api)


def access_log(path: Path, identity: str, generation: str, reason: str = RBAC_REASON) -> dict[str, Any]:
    fmt = {
        "t": "%START_TIME%",
        "identity": identity,
        "policy": generation,
        "sni": "%REQUESTED_SERVER_NAME%",
        "host": "%REQ(:AUTHORITY)%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ_WITHOUT_QUERY(:PATH)%",
        "code": "%RESPONSE_CODE%",
        "reason": reason,
        "flags": "%RESPONSE_FLAGS%",
        "upstream": "%UPSTREAM_HOST%",
        # an inspected name's verdict (boundary.contentgate): level, finding kinds, classifier
        "sensitivity": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:x-avm-sensitivity)%",
        "findings": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:x-avm-findings)%",
        "classifier": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:x-avm-classifier)%",
        "rpc": "%DYNAMIC_METADATA(envoy.filters.http.mcp:method)%",
        "tool": "%DYNAMIC_METADATA(envoy.filters.http.mcp:params:name)%",
        "pin": "%RESP(x-avm-pin)%",  # the pinning service's refusal (controlplane.boundary.mcppin)
        # why Envoy answered itself where no RBAC policy did (ext_authz, a body too large)
        "details": "%RESPONSE_CODE_DETAILS%",
        # usage (controlplane.boundary.usage): body bytes from the agent's side, tokens the
        # upstream reported, the budget a 429 of the gateway's own names
        "bytes_sent": "%BYTES_RECEIVED%",
        "bytes_received": "%BYTES_SENT%",
        "input_tokens": "%DYNAMIC_METADATA(avm.usage:input_tokens)%",
        "output_tokens": "%DYNAMIC_METADATA(avm.usage:output_tokens)%",
        "budget": "%RESP(x-avm-budget)%",
    }
    assert tuple(fmt) == LOG_FIELDS
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": _T + "extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {
                "json_format": fmt,
                "formatters": [
                    {
                        "name": "envoy.formatter.req_without_query",
                        "typed_config": {
                            "@type": _T + "extensions.formatter.req_without_query.v3.ReqWithoutQuery"
                        },
                    }
                ],
            },
        },
    }
