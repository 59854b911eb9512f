"""``avm.boundary``: the name only the gateway answers, on each identity's own listener. Pure.

A listener per identity on port 80 of its own address, plain HTTP (the agent needs no CA to ask):

- ``GET /policy``: Envoy answers it itself (``direct_response``) with the identity's policy as
  rendered (``requests.policy_view``): who is asking is the listener, nothing the agent sends;
- ``POST /requests``: routed, body at most ``requests.MAX_BODY`` bytes (the buffer filter
  answers 413 beyond), to the request recorder's unix socket, with ``x-avm-identity`` set
  (overwritten) from the listener. The recorder only stores; the agent can change no policy;
- anything else: 404 with a JSON body naming the two routes; another Host: 403.

Every request is an access-log line, like the egress listeners'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from controlplane.boundary import requests
from controlplane.boundary.policy import EgressPolicy
from controlplane.boundary.routes import ROUTE_REASON, access_log

_T = "type.googleapis.com/envoy."
CLUSTER = "avm|requests"
ASK = {"request": requests.ASK, "policy_at": requests.READ}
_JSON = [
    {
        "header": {"key": "content-type", "value": "application/json"},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }
]


def _answer(status: int, doc: dict[str, Any], reason: str) -> dict[str, Any]:
    return {
        "direct_response": {"status": status, "body": {"inline_string": json.dumps(doc, sort_keys=True)}},
        "response_headers_to_add": _JSON,
        "metadata": {"filter_metadata": {"avm": {"reason": reason}}},
    }


def _method(name: str) -> list[dict[str, Any]]:
    return [{"name": ":method", "string_match": {"exact": name}}]


def listener(identity: str, address: dict[str, Any], policy: EgressPolicy, log: Path) -> dict[str, Any]:
    """The identity's ``avm.boundary`` listener (``address``: render's socket address dict)."""
    view = requests.policy_view(identity, policy)
    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "avm_boundary",
        "codec_type": "HTTP1",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "strip_any_host_port": True,
        "use_remote_address": True,
        "skip_xff_append": True,
        "generate_request_id": False,
        "access_log": [access_log(log, identity, policy.generation, ROUTE_REASON)],
        "route_config": {
            "name": f"{identity}/{requests.RESERVED}",
            "virtual_hosts": [
                {
                    "name": "boundary",
                    "domains": [requests.RESERVED],
                    "routes": [
                        {
                            "match": {"path": "/policy", "headers": _method("GET")},
                            **_answer(200, view, "boundary-policy"),
                        },
                        {
                            "match": {"path": "/requests", "headers": _method("POST")},
                            "route": {"cluster": CLUSTER, "timeout": "5s"},
                            "request_headers_to_add": [
                                {
                                    "header": {"key": requests.IDENTITY_HEADER, "value": identity},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                }
                            ],
                            "metadata": {"filter_metadata": {"avm": {"reason": "boundary-request"}}},
                        },
                        {
                            "match": {"prefix": "/"},
                            **_answer(404, {"error": "not-found", **ASK}, "boundary-not-found"),
                        },
                    ],
                },
                {
                    "name": "other",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            **_answer(
                                403, {"denied": True, "reason": "host-not-allowed", **ASK}, "host-not-allowed"
                            ),
                        }
                    ],
                },
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": requests.MAX_BODY,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.router.v3.Router",
                    "suppress_envoy_headers": True,
                },
            },
        ],
    }
    return {
        "@type": _T + "config.listener.v3.Listener",
        "name": f"{identity}/{requests.PORT}",
        "address": address,
        "metadata": {"filter_metadata": {"avm": {"identity": identity, "policy": policy.generation}}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def cluster(socket: Path) -> dict[str, Any]:
    """The request recorder, on its unix socket (connectable by the gateway's group only)."""
    return {
        "@type": _T + "config.cluster.v3.Cluster",
        "name": CLUSTER,
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket)}}}}]}],
        },
    }
