"""Budgets enforced by the gateway itself, as Envoy configuration: a 429 with a JSON reason.

Two kinds, both Envoy's ``local_ratelimit`` token buckets (no Python, no state outside Envoy):

- per destination (``NameRule.budget.requests_per_minute``): a bucket in the destination's own
  filter chain, first of its HTTP filters (a request refused here never gets the credential);
  it holds N tokens and is refilled to N every minute;
- run-wide (``EgressPolicy.run_requests``, a job's ``egress.budget.requests``): every chain of
  the identity routes to one internal listener (``budget|<identity>``) whose single bucket of N
  tokens counts requests to all destinations together. A bucket belongs to one filter
  instance and each chain has its own, so a bucket shared across chains needs that one hop
  (measured: two chains, one bucket of 3 -> the 4th request overall is refused). It refills
  only after ``RUN_FILL`` (30 days), longer than any job may run (24 h at most), so within a run
  it is a budget, not a rate. It lives as long as the listener: a gateway restart or a change
  of the identity's listener starts a fresh bucket.

An exhausted bucket answers ``429`` with ``x-avm-budget: <budget>`` and the body
``{"budget", "denied": true, "destination", "policy", "reason": "budget-exhausted"}`` (the
shape of ``routes.deny``); the access log records the budget from that header. Responses
from upstream servers have any ``x-avm-budget`` header removed, so only the gateway can set it.
"""

from __future__ import annotations

from typing import Any

from controlplane.boundary.policy import EgressPolicy, NameRule

_T = "type.googleapis.com/envoy."
REASON = "budget-exhausted"
HEADER = "x-avm-budget"
BUDGETS = ("requests_per_minute", "requests")
RUN_FILL = "2592000s"  # 30 days: never within a job's timeout (24 h at most)
_ALL = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}


def internal_name(identity: str) -> str:
    """The internal listener (and cluster) holding ``identity``'s run-wide bucket."""
    return f"budget|{identity}"


def _bucket(stat_prefix: str, tokens: int, fill: str, budget: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": _T + "extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": stat_prefix,
            "status": {"code": 429},
            "token_bucket": {"max_tokens": tokens, "tokens_per_fill": tokens, "fill_interval": fill},
            "filter_enabled": {**_ALL, "runtime_key": "avm_budget_enabled"},
            "filter_enforced": {**_ALL, "runtime_key": "avm_budget_enforced"},
            "response_headers_to_add": [
                {"header": {"key": HEADER, "value": budget}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            ],
        },
    }


def rule_filters(rule: NameRule) -> list[dict[str, Any]]:
    """The destination's own bucket (none without a budget): first of the chain's HTTP filters."""
    if rule.budget is None:
        return []
    stat = f"budget_{rule.host.replace('*', 'any')}_{rule.port}"
    return [_bucket(stat, rule.budget.requests_per_minute, "60s", "requests_per_minute")]


def local_reply(destination: str, generation: str) -> dict[str, Any]:
    """The HCM's ``local_reply_config``: a 429 the gateway made (only a bucket makes one) gets the
    JSON body naming the budget. ``destination`` may be a command operator (``%REQ(...)%``)."""
    body = (
        '{"budget":"%RESP(' + HEADER + ')%","denied":true,"destination":"' + destination + '",'
        '"policy":"' + generation + '","reason":"' + REASON + '"}'
    )
    return {
        "mappers": [
            {
                "filter": {
                    "status_code_filter": {
                        "comparison": {"op": "EQ", "value": {"default_value": 429, "runtime_key": "avm_429"}}
                    }
                },
                "body_format_override": {
                    "text_format_source": {"inline_string": body},
                    "content_type": "application/json",
                },
            }
        ]
    }


def strip_header(policy: EgressPolicy) -> list[str]:
    """Response headers a chain removes from what comes back: ``x-avm-budget`` from an upstream,
    unless the chain's upstream is the run-wide hop (which removes it from the real upstream's
    answers itself, and whose 429 must keep it)."""
    return [] if policy.run_requests is not None else [HEADER]


def reroute(routes: list[dict[str, Any]], identity: str, policy: EgressPolicy) -> list[dict[str, Any]]:
    """With a run-wide budget, the chain's allowed routes go through the identity's hop."""
    if policy.run_requests is None:
        return routes
    hop = internal_name(identity)
    return [{**r, "route": {**r["route"], "cluster": hop}} if "route" in r else r for r in routes]


def run_wide(identity: str, policy: EgressPolicy, cluster_of: dict[str, str]) -> tuple[dict[str, Any], ...]:
    """(internal listener, its cluster) for ``identity``'s run-wide bucket; () without one.
    ``cluster_of``: listed host -> the cluster that reaches it."""
    if policy.run_requests is None:
        return ()
    name = internal_name(identity)
    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": f"budget_run_{identity.replace(':', '_')}",
        "codec_type": "HTTP1",
        "generate_request_id": False,
        "local_reply_config": local_reply("%REQ(:AUTHORITY)%", policy.generation),
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {
                    "name": host,
                    "domains": [host],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "60s"}}],
                    "response_headers_to_remove": [HEADER],
                    "request_headers_to_remove": ["x-forwarded-for", "x-forwarded-proto", "x-request-id"],
                }
                for host, cluster in sorted(cluster_of.items())
            ],
        },
        "http_filters": [
            _bucket(f"budget_run_{identity.replace(':', '_')}", policy.run_requests, RUN_FILL, "requests"),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.router.v3.Router",
                    "suppress_envoy_headers": True,
                },
            },
        ],
    }
    listener = {
        "@type": _T + "config.listener.v3.Listener",
        "name": name,
        "metadata": {"filter_metadata": {"avm": {"identity": identity, "policy": policy.generation}}},
        "internal_listener": {},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    endpoint = {"address": {"envoy_internal_address": {"server_listener_name": name}}}
    cluster = {
        "@type": _T + "config.cluster.v3.Cluster",
        "name": name,
        "connect_timeout": "5s",
        "type": "STATIC",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]},
    }
    return listener, cluster


BOOTSTRAP_EXTENSION = {
    "name": "envoy.bootstrap.internal_listener",
    "typed_config": {"@type": _T + "extensions.bootstrap.internal_listener.v3.InternalListener"},
}
