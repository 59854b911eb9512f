"""Budgets enforced by the gateway itself, as Envoy configuration: a 429 with a JSON reason.

Two kinds, both Envoy's ``local_ratelimit`` token buckets (no Python, no state outside Envoy):

- per destination (``NameRule.budget``): buckets in the destination's own filter chain, first
  of its HTTP filters (a request refused here never gets the credential), each holding N
  tokens and refilled to N every minute: ``requests_per_minute`` (a token per request) and
  ``request_bytes_per_minute`` (a token per request body byte: the buffer filter holds each
  request whole, up to ``min(N, MAX_BODY)``, and sets its ``content-length``, which the bucket
  takes as the request's hits; a larger body is a 413). Response bytes are not budgeted: the
  gateway learns them only as they stream back, when a local bucket can no longer refuse the
  request (measured: ``apply_on_stream_done`` is not honoured by ``local_ratelimit``); they are
  counted in usage;
- run-wide (``EgressPolicy.run_requests``, a job's ``egress.budget.requests``): every chain of
  the identity routes to one internal listener (``budget|<identity>``) whose single bucket of N
  tokens counts requests to all destinations together. A bucket belongs to one filter
  instance and each chain has its own, so a bucket shared across chains needs that one hop
  (measured: two chains, one bucket of 3 -> the 4th request overall is refused). It refills
  only after ``RUN_FILL`` (30 days), longer than any job may run (24 h at most), so within a run
  it is a budget, not a rate. It lives as long as the listener: a gateway restart or a change
  of the identity's listener starts a fresh bucket.

An exhausted bucket answers ``429`` (a body over the byte budget ``413``) with
``x-avm-budget: <budget>`` and the body
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
BUDGETS = ("requests_per_minute", "request_bytes_per_minute", "requests")
MAX_BODY = 16 << 20  # a byte-budgeted destination's requests are buffered whole, up to this
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


def _bytes_bucket(stat_prefix: str, tokens: int) -> dict[str, Any]:
    """A bucket of request body bytes: each request takes its ``content-length`` in tokens (the
    buffer filter before it has set that header on every request with a body, chunked ones too);
    a request without a body matches no descriptor and falls to the default bucket, which Envoy
    requires: it is the largest there is, refilled every second, so it never refuses."""
    out = _bucket(stat_prefix, (1 << 32) - 1, "1s", "request_bytes_per_minute")
    config = out["typed_config"]
    config["always_consume_default_token_bucket"] = False
    config["descriptors"] = [
        {
            "entries": [{"key": "header_match", "value": "body"}],
            "token_bucket": {"max_tokens": tokens, "tokens_per_fill": tokens, "fill_interval": "60s"},
        }
    ]
    present = [{"name": "content-length", "present_match": True}]
    config["rate_limits"] = [
        {
            "actions": [{"header_value_match": {"descriptor_value": "body", "headers": present}}],
            "hits_addend": {"format": "%REQ(content-length)%"},
        }
    ]
    return out


def rule_filters(rule: NameRule) -> list[dict[str, Any]]:
    """The destination's own buckets (none without a budget): first of the chain's HTTP filters,
    requests first (it refuses before a body is buffered), then the buffer and the bytes."""
    if rule.budget is None:
        return []
    stat = f"budget_{rule.host.replace('*', 'any')}_{rule.port}"
    out: list[dict[str, Any]] = []
    if rule.budget.requests_per_minute is not None:
        out.append(_bucket(stat, rule.budget.requests_per_minute, "60s", "requests_per_minute"))
    if rule.budget.request_bytes_per_minute is not None:
        limit = rule.budget.request_bytes_per_minute
        buffer = {
            "@type": _T + "extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": min(limit, MAX_BODY),
        }
        out.append({"name": "envoy.filters.http.buffer", "typed_config": buffer})
        out.append(_bytes_bucket(stat + "_bytes", limit))
    return out


def _mapper(code: int, budget: str, destination: str, generation: str) -> dict[str, Any]:
    body = (
        '{"budget":"' + budget + '","denied":true,"destination":"' + destination + '",'
        '"policy":"' + generation + '","reason":"' + REASON + '"}'
    )
    out: dict[str, Any] = {
        "filter": {
            "status_code_filter": {
                "comparison": {"op": "EQ", "value": {"default_value": code, "runtime_key": f"avm_{code}"}}
            }
        },
        "body_format_override": {
            "text_format_source": {"inline_string": body},
            "content_type": "application/json",
        },
    }
    if code == 413:  # the buffer filter's refusal names no budget itself: the mapper does
        out["headers_to_add"] = [
            {"header": {"key": HEADER, "value": budget}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ]
    return out


def local_reply(destination: str, generation: str, rule: NameRule | None = None) -> dict[str, Any]:
    """The HCM's ``local_reply_config``: a 429 the gateway made (only a bucket makes one) gets the
    JSON body naming the budget; with a byte budget, so does the 413 for a body larger than it.
    ``destination`` may be a command operator (``%REQ(...)%``)."""
    mappers = [_mapper(429, "%RESP(" + HEADER + ")%", destination, generation)]
    if rule is not None and rule.budget is not None and rule.budget.request_bytes_per_minute is not None:
        mappers.append(_mapper(413, "request_bytes_per_minute", destination, generation))
    return {"mappers": mappers}


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
