"""The content gate of an ``inspect: true`` destination, as Envoy configuration. Pure.

The chain holds each request and sends its body to a classifier outside the agent
(``envoy.filters.http.ext_authz``, HTTP service; the protocol is docs/egress.md). The classifier
only gives a verdict; the gateway enforces the ceiling:

- ``early_header_mutation`` removes every ``x-avm-*`` header the agent sent before anything
  reads the request, and the check request carries no header of the agent's (all are
  ``disallowed_headers``): nothing the agent sends can steer the classifier or the ceiling;
- the verdict's ``x-avm-sensitivity`` header is set on the request (``allowed_upstream_headers``)
  and the routes are chosen again (``clear_route_cache``): a route matching the levels up to
  ``max_sensitivity`` forwards (the verdict headers are removed before upstream); a higher level
  is a direct 403 ``sensitivity-exceeds-ceiling``; no verdict header at all (a classifier that
  answered without one) is a 403 ``classifier-unavailable``;
- timeout, an error or an unreachable classifier (``failure_mode_allow: false``) and any
  non-200 answer are denials: a local reply mapped to the same JSON body shape as
  ``routes.deny``; a body over ``max_body`` is a 413 without asking;
- the verdict (level, finding kinds, classifier) is kept as the filter's dynamic metadata for
  the access log; the credential injector runs after this filter, so the classifier never sees
  an injected credential.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from controlplane.boundary.policy import NameRule
from controlplane.boundary.routes import cluster_name, deny, path_match

_T = "type.googleapis.com/envoy."
FILTER = "envoy.filters.http.ext_authz"
CLUSTER = "avm|classifier"
VERDICT_HEADERS = ("x-avm-sensitivity", "x-avm-findings", "x-avm-classifier")
REASONS = ("sensitivity-exceeds-ceiling", "classifier-unavailable", "body-too-large-to-inspect")
PATH_PREFIX = "/verdict"


@dataclasses.dataclass(frozen=True)
class Classifier:
    """Where the gateway reaches the classifier: a unix socket path, or ``(address, port)``."""

    address: Path | tuple[str, int]
    timeout_s: float = 2.0
    max_body: int = 256 * 1024


def _ms(seconds: float) -> str:
    return f"{seconds:.3f}s"


def ext_authz(classifier: Classifier) -> dict[str, Any]:
    """The chain's ``ext_authz`` filter (first in the chain)."""
    exact = [{"exact": h} for h in VERDICT_HEADERS]
    return {
        "name": FILTER,
        "typed_config": {
            "@type": _T + "extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "http_service": {
                "server_uri": {
                    "uri": "http://avm-classifier",
                    "cluster": CLUSTER,
                    "timeout": _ms(classifier.timeout_s),
                },
                "path_prefix": PATH_PREFIX,
                "authorization_response": {
                    "allowed_upstream_headers": {"patterns": exact},
                    "dynamic_metadata_from_headers": {"patterns": exact},
                },
            },
            "disallowed_headers": {"patterns": [{"safe_regex": {"regex": "[^:].*"}}]},
            "with_request_body": {
                "max_request_bytes": classifier.max_body,
                "allow_partial_message": False,
                "pack_as_bytes": True,
            },
            "failure_mode_allow": False,
            "status_on_error": {"code": 403},
            "clear_route_cache": True,
        },
    }


def early_mutation() -> list[dict[str, Any]]:
    """The HCM's ``early_header_mutation_extensions``: the agent's ``x-avm-*`` headers removed."""
    return [
        {
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": _T + "extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": [{"remove": h} for h in VERDICT_HEADERS],
            },
        }
    ]


def disabled() -> dict[str, Any]:
    return {FILTER: {"@type": _T + "extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", "disabled": True}}


def _deny(reason: str, rule: NameRule, generation: str, status: int = 403) -> dict[str, Any]:
    out = deny(reason, rule, generation)
    body = json.loads(out["direct_response"]["body"]["inline_string"]) | {
        "max_sensitivity": rule.max_sensitivity
    }
    out["direct_response"] = {"status": status, "body": {"inline_string": json.dumps(body, sort_keys=True)}}
    return out


def routes(rule: NameRule, generation: str) -> list[dict[str, Any]]:
    """An inspected name's routes (``routes.routes`` with the verdict between method and path)."""
    methods = "|".join(sorted(rule.methods))
    only = {"name": ":method", "string_match": {"safe_regex": {"regex": f"^(?:{methods})$"}}}
    levels = "|".join(rule.allowed_sensitivities)
    within = {"name": VERDICT_HEADERS[0], "string_match": {"safe_regex": {"regex": f"^(?:{levels})$"}}}
    verdict = {"name": VERDICT_HEADERS[0], "present_match": True}
    out: list[dict[str, Any]] = []
    for path in rule.paths:
        match = path_match(path)
        over = _deny("sensitivity-exceeds-ceiling", rule, generation)
        over["response_headers_to_add"] += [
            {
                "header": {"key": h, "value": f"%REQ({h})%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
            for h in VERDICT_HEADERS
        ]
        out += [
            {
                "match": {**match, "headers": [only, within]},
                "route": {"cluster": cluster_name(rule), "timeout": "60s"},
                "request_headers_to_remove": list(VERDICT_HEADERS),
                "metadata": {"filter_metadata": {"avm": {"reason": "allowed"}}},
            },
            {"match": {**match, "headers": [only, verdict]}, **over},
            # where a request first lands (its x-avm-* headers removed): the classifier is asked
            # here; still here afterwards means no verdict came back
            {"match": {**match, "headers": [only]}, **_deny("classifier-unavailable", rule, generation)},
            {
                "match": match,
                **deny("method-not-allowed", rule, generation),
                "typed_per_filter_config": disabled(),
            },
        ]
    out.append(
        {
            "match": {"prefix": "/"},
            **deny("path-not-allowed", rule, generation),
            "typed_per_filter_config": disabled(),
        }
    )
    return out


def local_replies(rule: NameRule, generation: str) -> dict[str, Any]:
    """The HCM's ``local_reply_config``: a failed or refused check (``UAEX``) and a body too
    large to inspect answer with the JSON body every denial has."""

    def body(reason: str) -> dict[str, Any]:
        doc = {
            "denied": True,
            "reason": reason,
            "destination": rule.key,
            "policy": generation,
            "max_sensitivity": rule.max_sensitivity,
        }
        return {"json_format": doc}

    status = {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": 413, "runtime_key": "avm.inspect.413"}}
        }
    }
    return {
        "mappers": [
            {
                "filter": {"response_flag_filter": {"flags": ["UAEX"]}},
                "status_code": 403,
                "body_format_override": body("classifier-unavailable"),
            },
            {"filter": status, "body_format_override": body("body-too-large-to-inspect")},
        ]
    }


def cluster(classifier: Classifier, uplink_netns: Path | None) -> dict[str, Any]:
    """The classifier's cluster: plain HTTP/1.1 to a unix socket or a loopback address."""
    if isinstance(classifier.address, Path):
        address: dict[str, Any] = {"pipe": {"path": str(classifier.address)}}
    else:
        addr, port = classifier.address
        address = {"socket_address": {"address": addr, "port_value": port}}
    out: dict[str, Any] = {
        "@type": _T + "config.cluster.v3.Cluster",
        "name": CLUSTER,
        "type": "STATIC",
        "connect_timeout": _ms(min(classifier.timeout_s, 1.0)),
        "load_assignment": {
            "cluster_name": CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
    if uplink_netns is not None and not isinstance(classifier.address, Path):
        out["upstream_bind_config"] = {
            "source_address": {
                "address": "0.0.0.0",  # noqa: S104 (a source address: any local one)
                "port_value": 0,
                "network_namespace_filepath": str(uplink_netns),
            }
        }
    return out
