"""How the gateway judges one request inside a listed name's filter chain, as Envoy routes.

Routes on the listed paths with a listed method go to the name's cluster; a listed path with
another method, any other path, and a Host header that is not the chain's name are answered by
Envoy itself with 403 and a JSON body an agent can read (``{"denied": true, "reason": ...,
"destination": "host:port", "policy": <generation>}``). The route's ``avm.reason`` metadata is
what the access log records, with the listener's identity and policy generation. No Python runs
in the request path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
)


def cluster_name(rule: NameRule) -> str:
    return f"out|{rule.host}|{rule.port}"


def deny(
    reason: str, rule: NameRule, generation: str, ask: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A 403 answered by Envoy. ``ask``: how a refused agent asks for more (``request``) and
    reads its policy (``policy_at``), added to the body where the boundary answers them."""
    body = {"denied": True, "reason": reason, "destination": rule.key, "policy": generation, **(ask or {})}
    return {
        "direct_response": {"status": 403, "body": {"inline_string": json.dumps(body, sort_keys=True)}},
        "metadata": {"filter_metadata": {"avm": {"reason": reason}}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def _path_match(path: str) -> dict[str, Any]:
    if path.endswith("/*"):
        return {"path_separated_prefix": path[:-2]} if len(path) > 2 else {"prefix": "/"}
    return {"path": path}


def routes(rule: NameRule, generation: str, ask: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    methods = "|".join(sorted(rule.methods))
    only = [{"name": ":method", "string_match": {"safe_regex": {"regex": f"^(?:{methods})$"}}}]
    routes: list[dict[str, Any]] = []
    for path in rule.paths:
        routes.append(
            {
                "match": {**_path_match(path), "headers": only},
                "route": {"cluster": cluster_name(rule), "timeout": "60s"},
                "metadata": {"filter_metadata": {"avm": {"reason": "allowed"}}},
            }
        )
        routes.append({"match": _path_match(path), **deny("method-not-allowed", rule, generation, ask)})
    routes.append({"match": {"prefix": "/"}, **deny("path-not-allowed", rule, generation, ask)})
    return routes


def access_log(path: Path, identity: str, generation: str) -> dict[str, Any]:
    fmt = {
        "t": "%START_TIME%",
        "identity": identity,
        "policy": generation,
        "sni": "%REQUESTED_SERVER_NAME%",
        "host": "%REQ(:AUTHORITY)%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ_WITHOUT_QUERY(:PATH)%",
        "code": "%RESPONSE_CODE%",
        "reason": "%METADATA(ROUTE:avm:reason)%",
        "flags": "%RESPONSE_FLAGS%",
        "upstream": "%UPSTREAM_HOST%",
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
