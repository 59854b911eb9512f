"""A listed name's upstream side, as Envoy data: its cluster and the TLS it re-originates. Pure.

The cluster of a name verifies the upstream against ``trusted_ca`` (the system store, or a test
CA), with the name's SNI and SAN check; a wildcard name resolves per request (dynamic forward
proxy, ``auto_sni`` / ``auto_san_validation``). A pinned upstream (``upstreams``, the target's
gateway options) is a static address; any other name is resolved by the gateway's DNS.
``uplink_netns``: upstream sockets are bound in that network namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from controlplane.boundary.policy import NameRule
from controlplane.boundary.routes import cluster_name

_T = "type.googleapis.com/envoy."


def address(addr: str, port: int, netns: Path | None = None) -> dict[str, Any]:
    sock: dict[str, Any] = {"address": addr, "port_value": port}
    if netns is not None:
        sock["network_namespace_filepath"] = str(netns)
    return {"socket_address": sock}


def dns_cache(rule: NameRule) -> dict[str, Any]:
    return {"name": f"dns|{rule.host}|{rule.port}", "dns_lookup_family": "V4_ONLY"}


def _upstream_tls(rule: NameRule, trusted_ca: Path) -> dict[str, Any]:
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(trusted_ca)}}
    tls: dict[str, Any] = {
        "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {"validation_context": validation},
    }
    if not rule.wildcard:  # a wildcard's SNI and SAN check follow each request's host (auto_sni)
        tls["sni"] = rule.host
        validation["match_typed_subject_alt_names"] = [{"san_type": "DNS", "matcher": {"exact": rule.host}}]
    return {"name": "envoy.transport_sockets.tls", "typed_config": tls}


def cluster(
    rule: NameRule,
    trusted_ca: Path,
    uplink_netns: Path | None,
    upstreams: Mapping[str, tuple[str, int]],
) -> dict[str, Any]:
    name = cluster_name(rule)
    out: dict[str, Any] = {
        "@type": _T + "config.cluster.v3.Cluster",
        "name": name,
        "connect_timeout": "5s",
        "transport_socket": _upstream_tls(rule, trusted_ca),
    }
    if uplink_netns is not None:
        source = address("0.0.0.0", 0, uplink_netns)  # noqa: S104 (a source address: any local one)
        out["upstream_bind_config"] = {"source_address": source["socket_address"]}
    if rule.wildcard:
        out["cluster_type"] = {
            "name": "envoy.clusters.dynamic_forward_proxy",
            "typed_config": {
                "@type": _T + "extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                "dns_cache_config": dns_cache(rule),
            },
        }
        out["lb_policy"] = "CLUSTER_PROVIDED"
        out["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "upstream_http_protocol_options": {"auto_sni": True, "auto_san_validation": True},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        }
        return out
    pinned = upstreams.get(rule.key)
    addr, port = pinned if pinned else (rule.host, rule.port)
    out["type"] = "STATIC" if pinned else "LOGICAL_DNS"
    if not pinned:
        out["dns_lookup_family"] = "V4_ONLY"
    out["load_assignment"] = {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(addr, port)}}]}],
    }
    return out
