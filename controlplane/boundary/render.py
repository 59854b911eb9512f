"""The gateway's configuration as data: a pure function of the policies and the file paths.

``render(spec)`` returns the Envoy bootstrap and the file-xDS documents (LDS, CDS, one SDS
document per credential) as dicts; nothing here reads or writes a file. How a request is judged:

- a listener per (identity, port) on the identity's own address (optionally bound inside a
  network namespace): the address is who is calling, nothing the agent sends is trusted;
- ``tls_inspector`` reads the SNI; there is one filter chain per listed name, terminating TLS
  with that name's leaf. An unlisted (or missing) SNI matches no chain: the connection is
  closed before any TLS session exists;
- in a chain, an RBAC filter judges host, path and method (and, for an MCP server, the JSON-RPC
  body the MCP filter parsed: ``controlplane.boundary.mcprules``); what it allows goes to the
  name's cluster, which re-originates TLS with that SNI and verifies the server against
  ``trusted_ca``; a denial is a 403 with a JSON body naming the reason (``host-not-allowed``
  for a Host header that is not the chain's name, ``path-not-allowed``, ``method-not-allowed``;
  ``controlplane.boundary.routes``);
- the chain's ``credential_injector`` (``overwrite: true``) sets the entry's header from an SDS
  secret read from a file, so a rotated value is used without a restart and an agent's header
  of that name is replaced; the credential exists in that one chain only (bound to host:port);
- every request is one JSON line in the access log, with the identity and policy generation.

LDS's ``version_info`` is the generation of the whole rendering (``Rendered.generation``), CDS's
the digest of the clusters alone (``Rendered.cds_version``: a policy change that keeps the
destinations needs no cluster update); Envoy's admin stats report both back once in force.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from controlplane.boundary import api as boundary_api
from controlplane.boundary import budget, contentgate, mcprules, upstream, usage
from controlplane.boundary import requests as boundary_requests
from controlplane.boundary.contentgate import Classifier
from controlplane.boundary.policy import EgressPolicy, NameRule
from controlplane.boundary.routes import access_log, cluster_name, local_replies, rbac_filter, routes
from controlplane.canonical import canonical_bytes, sha256_digest
from controlplane.errors import UsageError

_T = "type.googleapis.com/envoy."
_IDENTITY_RE = re.compile(r"^(?:job|profile|test):[a-z0-9][a-z0-9._-]{0,62}$")


@dataclasses.dataclass(frozen=True)
class Listener:
    """One identity's policy on its own address. ``netns``: bind inside that namespace (a path)."""

    identity: str
    address: ipaddress.IPv4Address
    policy: EgressPolicy
    netns: Path | None = None


@dataclasses.dataclass(frozen=True)
class GatewaySpec:
    """Everything ``render`` needs besides the policies: where files are, what to trust.

    ``leaves``: host (as listed, wildcards too) -> (cert, key) paths minted by the egress CA.
    ``secrets``: credential ref -> the root-only file holding its value.
    ``upstreams``: ``host:port`` -> a fixed ``(address, port)`` to connect to instead of
    resolving the name (a pinned resolution; tests use it for their namespace upstream).
    ``uplink_netns``: the namespace upstream connections are made in (a path). Envoy creates a
    listener's socket with ``network_namespace_filepath`` by switching the thread's namespace;
    naming the uplink on every cluster keeps upstream sockets out of a sandbox's namespace
    whatever thread makes them.
    """

    listeners: tuple[Listener, ...]
    xds_dir: Path
    admin_socket: Path
    access_log: Path
    trusted_ca: Path
    leaves: Mapping[str, tuple[Path, Path]]
    secrets: Mapping[str, Path]
    upstreams: Mapping[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    uplink_netns: Path | None = None
    # the content classifier inspected names ask (``inspect: true``); required when one is listed
    classifier: Classifier | None = None
    # the MCP pinning service (controlplane.boundary.mcppin) every ``mcp:`` entry goes through
    mcp_pin: tuple[str, int] | None = None
    # the request recorder's unix socket: when set, each identity also gets its avm.boundary
    # listener (port 80: GET /policy, POST /requests; ``boundary.api``) and denials say how to ask
    requests_socket: Path | None = None


@dataclasses.dataclass(frozen=True)
class Rendered:
    bootstrap: dict[str, Any]
    lds: dict[str, Any]
    cds: dict[str, Any]
    sds: dict[str, dict[str, Any]]  # file name under xds_dir/sds -> document
    generation: str
    policies: dict[str, str]  # identity -> its policy generation
    xds_dir: Path
    cds_version: str
    mcp_pin: dict[str, Any] | None = None  # the pinning service's config (mcp-pin.json)


def sds_name(ref: str) -> str:
    """The SDS secret (and file) name of a credential ref: ``secret://local/NAME`` -> ``cred-NAME``."""
    return "cred-" + ref.rsplit("/", 1)[1]


def _refuse(what: str, expected: str, actual: object) -> UsageError:
    return UsageError(
        "gateway-listener-invalid",
        f"gateway listener {what}: expected {expected}, got {actual!r}",
        hint="identities are job:<id>, profile:<name> or test:<name>; each gets its own address",
        details={"expected": expected, "actual": str(actual)},
    )


def _check(spec: GatewaySpec) -> None:
    seen: set[str] = set()
    for listener in spec.listeners:
        if not _IDENTITY_RE.fullmatch(listener.identity):
            raise _refuse("identity", _IDENTITY_RE.pattern, listener.identity)
        if listener.identity in seen:
            raise _refuse("identity", "each identity once", listener.identity)
        seen.add(listener.identity)
        for rule in listener.policy.names:
            if rule.host not in spec.leaves:
                raise _refuse("leaf", f"a leaf certificate for {rule.host}", sorted(spec.leaves))
            if rule.credential and rule.credential.ref not in spec.secrets:
                raise _refuse("secret", f"a secret file for {rule.credential.ref}", sorted(spec.secrets))
            if rule.inspect and spec.classifier is None:
                raise _refuse("classifier", f"a classifier address for inspected {rule.key}", None)
            if rule.mcp is not None and spec.mcp_pin is None:
                raise _refuse("mcp_pin", f"a pinning service for the MCP server {rule.key}", None)
    addrs = [(str(x.address), x.netns, p) for x in spec.listeners for p in x.policy.ports]
    if spec.requests_socket is not None and any(p == boundary_requests.PORT for *_, p in addrs):
        raise _refuse("port", f"no name on port {boundary_requests.PORT} (avm.boundary's)", addrs)
    if len(addrs) != len(set(addrs)):
        raise _refuse("address", "one identity per address and port", addrs)


def render(spec: GatewaySpec) -> Rendered:
    """Render the whole gateway. Raises ``UsageError('gateway-listener-invalid')`` for a bad
    identity, a duplicate address, or a listed name without a leaf or a credential without a file."""
    _check(spec)
    listeners = [_listener(spec, x, port) for x in spec.listeners for port in x.policy.ports]
    rules = {cluster_name(r): r for x in spec.listeners for r in x.policy.names if r.mcp is None}
    clusters = [
        upstream.cluster(rules[name], spec.trusted_ca, spec.uplink_netns, spec.upstreams)
        for name in sorted(rules)
    ]
    if spec.classifier is not None and any(r.inspect for x in spec.listeners for r in x.policy.names):
        clusters.append(contentgate.cluster(spec.classifier, spec.uplink_netns))
    servers = [(x.identity, r, x.policy.generation) for x in spec.listeners for r in x.policy.names if r.mcp]
    pin = None
    if servers and spec.mcp_pin is not None:  # the MCP servers are reached through the pinning service
        clusters.append(mcprules.pin_cluster(spec.mcp_pin, spec.uplink_netns))
        pin = mcprules.pin_config(spec.mcp_pin, servers, str(spec.trusted_ca), dict(spec.upstreams))
    for x in spec.listeners:  # run-wide budgets: one internal hop per identity that has one
        hop = budget.run_wide(x.identity, x.policy, {r.host: cluster_name(r) for r in x.policy.names})
        if hop:
            listeners.append(hop[0])
            clusters.append(hop[1])
    if spec.requests_socket is not None:
        for x in spec.listeners:
            where = upstream.address(str(x.address), boundary_requests.PORT, x.netns)
            listeners.append(boundary_api.listener(x.identity, where, x.policy, spec.access_log))
        clusters.append(boundary_api.cluster(spec.requests_socket))
    refs = sorted({r.credential.ref for r in rules.values() if r.credential})
    body = {"listeners": listeners, "clusters": clusters, "secrets": refs}
    generation = sha256_digest(canonical_bytes(json.loads(json.dumps(body, default=str))))
    lds = {"version_info": generation, "resources": listeners}
    cds_version = sha256_digest(canonical_bytes(json.loads(json.dumps(clusters, default=str))))
    cds = {"version_info": cds_version, "resources": clusters}
    sds = {f"{sds_name(ref)}.json": _sds(ref, spec.secrets[ref]) for ref in refs}
    policies = {x.identity: x.policy.generation for x in spec.listeners}
    return Rendered(_bootstrap(spec), lds, cds, sds, generation, policies, spec.xds_dir, cds_version, pin)


def _bootstrap(spec: GatewaySpec) -> dict[str, Any]:
    def source(name: str) -> dict[str, Any]:
        return {"path_config_source": {"path": str(spec.xds_dir / name)}, "resource_api_version": "V3"}

    return {
        "node": {"id": "avm-egress", "cluster": "avm"},
        "admin": {"address": {"pipe": {"path": str(spec.admin_socket), "mode": 0o600}}},
        "dynamic_resources": {"lds_config": source("lds.json"), "cds_config": source("cds.json")},
        "bootstrap_extensions": [budget.BOOTSTRAP_EXTENSION],  # run-wide budgets' internal listeners
    }


def _listener(spec: GatewaySpec, listener: Listener, port: int) -> dict[str, Any]:
    rules = [r for r in listener.policy.names if r.port == port]
    return {
        "@type": _T + "config.listener.v3.Listener",
        "name": f"{listener.identity}/{port}",
        "address": upstream.address(str(listener.address), port, listener.netns),
        "metadata": {
            "filter_metadata": {"avm": {"identity": listener.identity, "policy": listener.policy.generation}}
        },
        "listener_filters": [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": _T + "extensions.filters.listener.tls_inspector.v3.TlsInspector"},
            }
        ],
        "listener_filters_timeout": "5s",
        "filter_chains": [_chain(spec, listener, rule) for rule in rules],
    }


def _http_filters(spec: GatewaySpec, rule: NameRule) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = budget.rule_filters(rule)  # first: a refused request gets no credential
    if rule.mcp is not None:  # parses the JSON-RPC body into metadata for the RBAC filter
        filters.append(mcprules.mcp_filter())
    filters.append(rbac_filter(rule))  # the method/path/host (and tool) decision
    if rule.inspect and spec.classifier is not None:  # before the credential: never sent to it
        filters += [contentgate.ext_authz(spec.classifier), contentgate.ceiling_filter(rule)]
    if rule.credential is not None:
        name = sds_name(rule.credential.ref)
        source = {"path_config_source": {"path": str(spec.xds_dir / "sds" / f"{name}.json")}}
        generic: dict[str, Any] = {
            "@type": _T + "extensions.http.injected_credentials.generic.v3.Generic",
            "credential": {"name": name, "sds_config": {**source, "resource_api_version": "V3"}},
            "header": rule.credential.header,
        }
        if rule.credential.format != "{value}":
            generic["header_value_prefix"] = rule.credential.format.removesuffix("{value}")
        filters.append(
            {
                "name": "envoy.filters.http.credential_injector",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.credential_injector.v3.CredentialInjector",
                    "overwrite": True,
                    "allow_request_without_credential": False,
                    "credential": {
                        "name": "envoy.http.injected_credentials.generic",
                        "typed_config": generic,
                    },
                },
            }
        )
    if rule.wildcard:
        filters.append(
            {
                "name": "envoy.filters.http.dynamic_forward_proxy",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                    "dns_cache_config": upstream.dns_cache(rule),
                },
            }
        )
    filters.append(usage.lua_filter())
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": _T + "extensions.filters.http.router.v3.Router",
                "suppress_envoy_headers": True,
            },
        }
    )
    return filters


def _chain(spec: GatewaySpec, listener: Listener, rule: NameRule) -> dict[str, Any]:
    cert, key = spec.leaves[rule.host]
    generation = listener.policy.generation
    hcm: dict[str, Any] = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": f"egress_{rule.host.replace('*', 'any')}_{rule.port}",
        "codec_type": "HTTP1",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "strip_any_host_port": True,
        "use_remote_address": True,
        "skip_xff_append": True,
        "generate_request_id": False,
        "access_log": [access_log(spec.access_log, listener.identity, listener.policy.generation)],
        "route_config": {
            "name": f"{listener.identity}/{rule.key}",
            "virtual_hosts": [
                {
                    "name": "listed",
                    "domains": ["*"],  # the Host header is judged by RBAC (host-not-allowed)
                    "routes": budget.reroute(
                        [
                            mcprules.pin_route(r, listener.identity, rule.key) if rule.mcp else r
                            for r in routes(rule, generation)
                        ],
                        listener.identity,
                        listener.policy,
                    ),
                    "response_headers_to_remove": budget.strip_header(listener.policy),
                    # nothing about the sandbox side travels upstream
                    "request_headers_to_remove": [
                        "x-forwarded-for",
                        "x-envoy-external-address",
                        "x-request-id",
                    ],
                },
            ],
        },
        # a denial's JSON body: the RBAC reasons, then the budgets' 429 / 413
        "local_reply_config": {
            "mappers": local_replies(rule, generation, _ask(spec))["mappers"]
            + budget.local_reply(rule.key, generation, rule)["mappers"]
        },
        "http_filters": _http_filters(spec, rule),
    }
    if rule.inspect:
        hcm["early_header_mutation_extensions"] = contentgate.early_mutation()
        hcm["local_reply_config"]["mappers"] += contentgate.local_replies(rule, generation)["mappers"]
        listed = hcm["route_config"]["virtual_hosts"][0]
        listed["request_headers_to_remove"] += list(contentgate.VERDICT_HEADERS)  # never upstream
    return {
        "name": rule.key,
        "filter_chain_match": {"server_names": [rule.host]},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["http/1.1"],
                    "tls_certificates": [
                        {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                    ],
                },
            },
        },
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
    }


def _ask(spec: GatewaySpec) -> dict[str, str] | None:
    return boundary_api.ASK if spec.requests_socket is not None else None


def _sds(ref: str, value_file: Path) -> dict[str, Any]:
    return {
        "resources": [
            {
                "@type": _T + "extensions.transport_sockets.tls.v3.Secret",
                "name": sds_name(ref),
                "generic_secret": {"secret": {"filename": str(value_file)}},
            }
        ]
    }


def dump(doc: Mapping[str, Any]) -> bytes:
    """A document's file bytes. JSON, not YAML: Envoy parses a 50-listener LDS file several times
    faster, and every file ``documents`` names ends in ``.json``."""
    return json.dumps(dict(doc), sort_keys=True, indent=1).encode()


def documents(rendered: Rendered) -> dict[str, dict[str, Any]]:
    """Every file of a rendering, by path relative to the xDS directory (bootstrap included)."""
    out = {"bootstrap.json": rendered.bootstrap, "cds.json": rendered.cds, "lds.json": rendered.lds}
    out.update({f"sds/{name}": doc for name, doc in rendered.sds.items()})
    if rendered.mcp_pin is not None:
        out["mcp-pin.json"] = rendered.mcp_pin
    return out
