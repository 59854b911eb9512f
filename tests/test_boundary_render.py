"""The gateway's rendering: pinned by golden files, checked by Envoy itself, refused when unsafe.

The golden files under tests/fixtures/boundary/golden/ are the exact documents ``render``
produces for one spec (two identities, an exact name with a key, a wildcard with a bearer
token, a name without a credential). After an intended change, regenerate them with
``AVM_GOLDEN_WRITE=1 pytest tests/test_boundary_render.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest

from controlplane.boundary import envoy
from controlplane.boundary.ca import EgressCA
from controlplane.boundary.gateway import stages
from controlplane.boundary.policy import EgressPolicy, parse_policy
from controlplane.boundary.render import GatewaySpec, Listener, Rendered, documents, render
from controlplane.boundary.routes import REASONS
from controlplane.errors import OperationalError, UsageError

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "boundary" / "golden"
ROOT = Path("/var/lib/avm-egress")


def policies() -> tuple[EgressPolicy, EgressPolicy]:
    alpha = parse_policy(
        [
            {
                "host": "api.example.com",
                "methods": ["POST"],
                "paths": ["/v1/messages"],
                "credential": {"header": "x-api-key", "ref": "secret://local/anthropic"},
            },
            {"host": "pypi.example.org", "methods": ["GET", "HEAD"], "paths": ["/simple/*"]},
        ]
    )
    beta = parse_policy(
        [
            {
                "host": "*.github.example",
                "port": 8443,
                "methods": ["GET"],
                "paths": ["/repos/*"],
                "credential": {
                    "header": "authorization",
                    "ref": "secret://local/gh",
                    "format": "Bearer {value}",
                },
            }
        ]
    )
    return alpha, beta


def spec(
    root: Path = ROOT, trusted_ca: Path | None = None, leaves: dict[str, Any] | None = None
) -> GatewaySpec:
    alpha, beta = policies()
    hosts = ("api.example.com", "pypi.example.org", "*.github.example")
    return GatewaySpec(
        listeners=(
            Listener("profile:alpha", ipaddress.IPv4Address("10.240.0.1"), alpha),
            Listener("job:j-42", ipaddress.IPv4Address("10.231.0.1"), beta, Path("/run/netns/avm-t--j-42")),
        ),
        xds_dir=root / "xds",
        admin_socket=root / "admin.sock",
        access_log=root / "access.log",
        trusted_ca=trusted_ca or Path("/etc/ssl/certs/ca-certificates.crt"),
        leaves=leaves or {h: (root / "ca" / f"{h}.pem", root / "ca" / f"{h}.key") for h in hosts},
        secrets={
            "secret://local/anthropic": root / "secrets/anthropic",
            "secret://local/gh": root / "secrets/gh",
        },
        uplink_netns=Path("/proc/1/ns/net"),
    )


def test_rendering_matches_the_golden_files() -> None:
    docs = {
        name: json.dumps(doc, sort_keys=True, indent=1) + "\n"
        for name, doc in documents(render(spec())).items()
    }
    if os.environ.get("AVM_GOLDEN_WRITE") == "1":
        for name, text in docs.items():
            (GOLDEN / name).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / name).write_text(text)
    on_disk = {str(p.relative_to(GOLDEN)): p.read_text() for p in sorted(GOLDEN.rglob("*.json"))}
    assert on_disk == docs


def test_rendering_is_pure_and_its_generation_follows_every_policy() -> None:
    one, two = render(spec()), render(spec())
    assert one == two
    assert one.lds["version_info"] == one.generation
    assert one.cds["version_info"] == one.cds_version != one.generation
    alpha, beta = policies()
    assert one.policies == {"profile:alpha": alpha.generation, "job:j-42": beta.generation}
    changed = dataclasses.replace(spec(), listeners=spec().listeners[:1])
    assert render(changed).generation != one.generation
    # a policy change that keeps the destinations changes the generation, not the clusters
    narrower = parse_policy(
        [
            {**alpha.names[0].model_dump(mode="json"), "paths": ["/v1/other"]},
            alpha.names[1].model_dump(mode="json"),
        ]
    )
    same_clusters = dataclasses.replace(
        spec(), listeners=(dataclasses.replace(spec().listeners[0], policy=narrower), spec().listeners[1])
    )
    assert render(same_clusters).generation != one.generation
    assert render(same_clusters).cds_version == one.cds_version


def test_each_listed_name_has_its_own_chain_and_nothing_else_has_one() -> None:
    rendered = render(spec())
    chains = {
        x["name"]: [c["filter_chain_match"]["server_names"] for c in x["filter_chains"]]
        for x in rendered.lds["resources"]
    }
    assert chains == {
        "profile:alpha/443": [["api.example.com"], ["pypi.example.org"]],
        "job:j-42/8443": [["*.github.example"]],
    }
    # no filter chain without a server name (it would catch unlisted names) and no default chain
    for x in rendered.lds["resources"]:
        assert "default_filter_chain" not in x


def _hcm(rendered: Rendered, listener: str, chain: int) -> dict[str, Any]:
    x = next(x for x in rendered.lds["resources"] if x["name"] == listener)
    typed: dict[str, Any] = x["filter_chains"][chain]["filters"][0]["typed_config"]
    return typed


def test_a_credential_is_injected_only_in_its_own_destination_chain() -> None:
    rendered = render(spec())
    names = [[f["name"] for f in _hcm(rendered, "profile:alpha/443", i)["http_filters"]] for i in range(2)]
    assert names == [
        ["envoy.filters.http.credential_injector", "envoy.filters.http.router"],
        ["envoy.filters.http.router"],
    ]
    injector = _hcm(rendered, "profile:alpha/443", 0)["http_filters"][0]["typed_config"]
    assert injector["overwrite"] is True
    assert injector["credential"]["typed_config"]["header"] == "x-api-key"
    bearer = _hcm(rendered, "job:j-42/8443", 0)["http_filters"][0]["typed_config"]
    assert bearer["credential"]["typed_config"]["header_value_prefix"] == "Bearer "
    # the secret value is never in a rendered document: only the file it is read from
    text = json.dumps(documents(rendered))
    assert str(ROOT / "secrets/anthropic") in text


def test_every_denial_reason_is_a_direct_403_with_a_json_body() -> None:
    rendered = render(spec())
    alpha = policies()[0]
    hcm = _hcm(rendered, "profile:alpha/443", 0)
    routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    bodies = [
        json.loads(r["direct_response"]["body"]["inline_string"]) for r in routes if "direct_response" in r
    ]
    assert sorted(b["reason"] for b in bodies) == sorted(REASONS)
    assert {b["policy"] for b in bodies} == {alpha.generation}
    assert {b["destination"] for b in bodies} == {"api.example.com:443"}
    assert {r["direct_response"]["status"] for r in routes if "direct_response" in r} == {403}


def test_a_listed_name_without_a_leaf_or_secret_is_refused() -> None:
    base = spec()
    with pytest.raises(UsageError) as err:
        render(dataclasses.replace(base, leaves={}))
    assert err.value.code == "gateway-listener-invalid"
    with pytest.raises(UsageError) as err:
        render(dataclasses.replace(base, secrets={}))
    assert err.value.code == "gateway-listener-invalid"
    twin = dataclasses.replace(base.listeners[0], identity="profile:twin")
    with pytest.raises(UsageError) as err:  # two identities on one address and port
        render(dataclasses.replace(base, listeners=(*base.listeners, twin)))
    assert err.value.code == "gateway-listener-invalid"
    with pytest.raises(UsageError) as err:
        render(dataclasses.replace(base, listeners=(dataclasses.replace(twin, identity="Alpha"),)))
    assert err.value.code == "gateway-listener-invalid"


def test_the_golden_spec_passes_envoy_validate(tmp_path: Path) -> None:
    """The same spec with real files (leaves of a fresh CA, a trust bundle, secret files)."""
    ca = EgressCA.ensure(tmp_path / "ca")
    hosts = ("api.example.com", "pypi.example.org", "*.github.example")
    for name in ("anthropic", "gh"):
        (tmp_path / "secrets").mkdir(exist_ok=True)
        (tmp_path / "secrets" / name).write_bytes(b"x")
    rendered = render(spec(tmp_path, ca.cert_path, {h: ca.leaf(h) for h in hosts}))
    envoy.validate(rendered)  # raises gateway-config-invalid if Envoy refuses it


def test_envoy_validate_refuses_a_broken_rendering(tmp_path: Path) -> None:
    ca = EgressCA.ensure(tmp_path / "ca")
    rendered = render(
        spec(
            tmp_path,
            ca.cert_path,
            {h: ca.leaf(h) for h in ("api.example.com", "pypi.example.org", "*.github.example")},
        )
    )
    broken = json.loads(json.dumps(rendered.cds))
    broken["resources"][0]["connect_timeout"] = "soon"
    with pytest.raises(OperationalError) as err:
        envoy.validate(dataclasses.replace(rendered, cds=broken))
    assert err.value.code == "gateway-config-invalid"
    assert err.value.details["generation"] == rendered.generation


def test_the_binary_is_the_pinned_wheel_and_its_digest_is_its_bytes() -> None:
    import hashlib

    b = envoy.binary()
    assert b.version.split("/")[1] == envoy.VERSION
    assert b.sha256 == "sha256:" + hashlib.sha256(b.path.read_bytes()).hexdigest()


def _without_listener(s: GatewaySpec, identity: str) -> GatewaySpec:
    return dataclasses.replace(s, listeners=tuple(x for x in s.listeners if x.identity != identity))


def test_a_reload_stages_clusters_around_the_listeners_for_both_tiers() -> None:
    both, alpha_only = render(spec()), render(_without_listener(spec(), "job:j-42"))

    def names(doc: dict[str, Any]) -> list[str]:
        return sorted(r["name"] for r in doc["resources"])

    # removing a listener whose clusters go: the union first, then listeners, then the final set
    plan = stages(both.cds["resources"], both.cds_version, alpha_only)
    assert [(s.file, s.kind) for s in plan] == [("cds.json", "cds"), ("lds.json", "lds"), ("cds.json", "cds")]
    assert names(plan[0].doc) == names(both.cds) and plan[0].version == "staged|" + alpha_only.cds_version
    assert (plan[1].version, plan[2].version) == (alpha_only.generation, alpha_only.cds_version)
    assert names(plan[2].doc) == names(alpha_only.cds) != names(both.cds)

    # adding one: the new clusters are a superset, so they go first as they are, no final step
    plan = stages(alpha_only.cds["resources"], alpha_only.cds_version, both)
    assert [(s.kind, s.version) for s in plan] == [("cds", both.cds_version), ("lds", both.generation)]

    # the same clusters: only the listeners change
    plan = stages(both.cds["resources"], both.cds_version, both)
    assert [(s.kind, s.version) for s in plan] == [("lds", both.generation)]
