"""The content gate of an ``inspect: true`` destination, as Envoy configuration. Pure.

The chain holds each request and sends its body to a classifier outside the agent
(``envoy.filters.http.ext_authz``, HTTP service; the protocol is docs/egress.md). The classifier
only gives a verdict; the gateway enforces the ceiling:

- ``early_header_mutation`` removes every ``x-avm-*`` header the agent sent before anything
  reads the request, and the check request carries no header of the agent's (all are
  ``disallowed_headers``): nothing the agent sends can steer the classifier or the ceiling;
- the chain's RBAC filter judges method, path and host first (a refused request is never sent
  to the classifier); then ``ext_authz`` asks for the verdict, whose ``x-avm-sensitivity``
  header is set on the request (``allowed_upstream_headers``), and a second RBAC filter
  (``ceiling_filter``) enforces ``max_sensitivity``: a higher level is a 403
  ``sensitivity-exceeds-ceiling``, no verdict header at all (a classifier that answered without
  one) a 403 ``classifier-unavailable``; the verdict headers are removed before upstream;
- timeout, an error or an unreachable classifier (``failure_mode_allow: false``) and any
  non-200 answer are denials: a local reply mapped to the same JSON body shape as
  ``routes.deny_body``; a body over ``max_body`` is a 413 without asking;
- the verdict (level, finding kinds, classifier) is kept as the filter's dynamic metadata for
  the access log; the credential injector runs after this filter, so the classifier never sees
  an injected credential.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from controlplane.boundary.policy import NameRule
from controlplane.boundary.routes import reply_mapper

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


def ceiling_filter(rule: NameRule) -> dict[str, Any]:
    """The second RBAC filter of an inspected chain, after ``ext_authz``: the verdict the
    classifier set on the request (``x-avm-sensitivity``; the agent's own was removed before
    anything read the request) must be one of the levels up to the ceiling. A request without a
    verdict (a classifier that answered 200 without one) is ``classifier-unavailable``."""
    verdict = VERDICT_HEADERS[0]
    levels = "|".join(rule.allowed_sensitivities)
    present = {"header": {"name": verdict, "present_match": True}}
    within = {"header": {"name": verdict, "string_match": {"safe_regex": {"regex": f"^(?:{levels})$"}}}}

    def policy(permission: dict[str, Any]) -> dict[str, Any]:
        return {"principals": [{"any": True}], "permissions": [permission]}

    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _T + "extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "DENY",
                "policies": {
                    "classifier-unavailable": policy({"not_rule": present}),
                    "sensitivity-exceeds-ceiling": policy(
                        {"and_rules": {"rules": [present, {"not_rule": within}]}}
                    ),
                },
            },
        },
    }


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
    over = reply_mapper("sensitivity-exceeds-ceiling", body("sensitivity-exceeds-ceiling")["json_format"])
    over["headers_to_add"] = [  # the verdict, for the agent to see why (kinds only, never text)
        {"header": {"key": h, "value": f"%REQ({h})%"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for h in VERDICT_HEADERS
    ]
    return {
        "mappers": [
            over,
            reply_mapper("classifier-unavailable", body("classifier-unavailable")["json_format"]),
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
