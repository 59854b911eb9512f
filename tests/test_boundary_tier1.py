"""The Tier-1 gateway's pure parts: listener addresses per profile, and avm.yaml's egress entries
by name (validated by the boundary's policy model when the manifest is parsed: exit 64)."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from controlplane.boundary import tier1
from controlplane.errors import UsageError
from controlplane.release.manifest import EgressRule, parse_manifest

NAME = {"host": "api.example.com", "methods": ["POST"], "paths": ["/v1/messages"]}


def _manifest(egress: list[object], **extra: object) -> bytes:
    profile = {
        "name": "web",
        "risk_tier": "L1",
        "entrypoint": ["python3", "agent.py"],
        "egress": egress,
        "health": {"port": 18082},
        **extra,
    }
    return yaml.safe_dump({"profiles": [profile]}).encode()


def test_a_profile_keeps_its_listener_address_when_other_profiles_come_and_go() -> None:
    alone = tier1.addresses(["web"])
    others = [f"p{i}" for i in range(200)]
    # without the previous assignment a newcomer may hash onto web's address (this one does)
    assert tier1.addresses(["web", *others])["web"] != alone["web"]
    crowd = tier1.addresses(["web", *others], {"web": str(alone["web"])})
    assert crowd["web"] == alone["web"]
    assert len(set(crowd.values())) == 201  # collisions move to the next free address
    fewer = tier1.addresses(["web", *others[:50]], {k: str(v) for k, v in crowd.items()})
    assert fewer == {k: v for k, v in crowd.items() if k in fewer}
    assert all(
        a in ipaddress.IPv4Network("127.100.0.0/24") and a.packed[-1] not in (0, 255) for a in crowd.values()
    )


def test_ip_rules_and_names_are_split_from_one_egress_list() -> None:
    cred = {"header": "x-api-key", "ref": "secret://local/k"}
    manifest = parse_manifest(_manifest([{"host": "10.0.0.5", "port": 5432}, {**NAME, "credential": cred}]))
    profile = manifest.profiles[0]
    assert profile.egress == [EgressRule(host="10.0.0.5", port=5432)]
    assert [(r.host, r.port, r.methods, r.paths) for r in profile.egress_names.names] == [
        ("api.example.com", 443, ("POST",), ("/v1/messages",))
    ]
    assert profile.bound_refs == frozenset({"secret://local/k"})


@pytest.mark.parametrize(
    ("entry", "code"),
    [
        ({**NAME, "host": "*"}, "egress-name-wildcard"),
        ({**NAME, "host": "api.*.com"}, "egress-name-wildcard"),
        ({**NAME, "paths": ["v1/messages"]}, "egress-path-invalid"),
        ({"host": "api.example.com", "port": 443}, "egress-policy-invalid"),  # no methods, no paths
        (
            {**NAME, "credential": {"header": "host", "ref": "secret://local/k"}},
            "egress-credential-header-invalid",
        ),
        ({"credential": {"header": "x-api-key", "ref": "secret://local/k"}}, "egress-policy-invalid"),
    ],
)
def test_an_invalid_entry_by_name_is_refused_with_its_code(entry: dict[str, object], code: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_manifest(_manifest([entry]))
    assert err.value.code == code
    assert err.value.exit_code == 64
    assert err.value.message.startswith("avm.yaml: profile web egress")


def test_egress_names_is_not_an_avm_yaml_key() -> None:
    with pytest.raises(UsageError) as err:
        parse_manifest(_manifest([], egress_names={"names": []}))
    assert err.value.code == "manifest-invalid"


SEARCH = {
    "name": "search",
    "schema_sha256": "f590c569413b140e00c4f7239e66819edaffac388d3a189b6b7e256f5e3a4daf",
}
MCP = {"host": "tools.example.com", "methods": ["POST"], "paths": ["/mcp"]}


def test_an_mcp_entry_takes_the_profiles_tools_as_its_allowlist() -> None:
    manifest = parse_manifest(_manifest([{**MCP, "mcp": True}, NAME], tools=[SEARCH]))
    mcp, plain = manifest.profiles[0].egress_names.names
    assert mcp.mcp is not None and [t.model_dump() for t in mcp.mcp.tools] == [SEARCH]
    assert plain.mcp is None
    # without tools: listed, the server gets no tool call at all (an empty allowlist, not "any")
    [bare] = parse_manifest(_manifest([{**MCP, "mcp": True}])).profiles[0].egress_names.names
    assert bare.mcp is not None and bare.mcp.tools == ()


@pytest.mark.parametrize(
    "entry",
    [
        {**MCP, "mcp": "yes"},
        {**MCP, "mcp": {"tools": [SEARCH]}},  # tools are written once, under tools:
        {**MCP, "methods": ["GET", "POST"], "mcp": True},
    ],
)
def test_an_invalid_mcp_entry_is_refused_before_anything_else(entry: dict[str, object]) -> None:
    with pytest.raises(UsageError) as err:
        parse_manifest(_manifest([entry], tools=[SEARCH]))
    assert err.value.code == "egress-mcp-invalid"
    assert err.value.exit_code == 64


def test_a_profile_with_an_mcp_server_gets_the_pinning_service_under_its_own_user() -> None:
    manifest = parse_manifest(_manifest([{**MCP, "mcp": True}, NAME], tools=[SEARCH]))
    profile = manifest.profiles[0]
    gw = tier1.render_host(
        {"web": profile.egress_names}, ca_cert=b"CA", ca_fingerprint="sha256:" + "0" * 64, upstream_ca=b"UP"
    )
    assert gw is not None and gw.mcp_pin
    by_path = {f.path: f for f in gw.files}
    config = by_path[str(tier1.PIN_CONFIG)]
    assert (config.group, config.mode) == (tier1.PIN_USER, 0o640)
    rule = yaml.safe_load(config.data)["rules"]["profile:web|tools.example.com:443"]
    # its own copy of the upstream CA: the gateway's files (credentials among them) stay unreadable to it
    assert rule["cafile"] == str(tier1.PIN_CA) and by_path[str(tier1.PIN_CA)].group == tier1.PIN_USER
    assert rule["tools"] == {"search": SEARCH["schema_sha256"]}
    assert by_path[str(tier1.PIN_SCRIPT)].data.startswith(b'"""The MCP pinning service')
    assert not [p for p in by_path if p.endswith("mcp-pin.json")]
    # without an MCP server there is no pinning service at all
    plain = tier1.render_host({"web": parse_manifest(_manifest([NAME])).profiles[0].egress_names},
                              ca_cert=b"CA", ca_fingerprint="sha256:" + "0" * 64)  # fmt: skip
    assert plain is not None and not plain.mcp_pin
    assert not [f for f in plain.files if f.path.startswith(str(tier1.PIN_ETC))]
