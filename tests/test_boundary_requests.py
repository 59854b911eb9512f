"""Permission requests, pure parts: judging what the recorder stored (a table of hostile and good
records), granting a request into a policy, the change digest an approval signs, and the
rendering of ``avm.boundary`` (checked by Envoy itself). The flow on a real host is in
tests/test_gateway_nspawn.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from controlplane.boundary import api, envoy, requests, tier1
from controlplane.boundary.ca import EgressCA
from controlplane.boundary.policy import EgressPolicy, NameRule, parse_policy
from controlplane.boundary.render import GatewaySpec, Listener, render
from controlplane.errors import UsageError

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
RID = "rq-0123456789abcdef"
ASK = {"destination": "api.example.test", "methods": ["GET"], "paths": ["/v2/*"], "reason": "read v2 docs"}
BASE = parse_policy(
    [
        {
            "host": "api.example.test",
            "methods": ["GET", "POST"],
            "paths": ["/v1/*"],
            "credential": {"header": "x-api-key", "ref": "secret://local/k"},
        }
    ]
)


def record(body: Any = None, **over: Any) -> dict[str, Any]:
    text = body if isinstance(body, str) else json.dumps(ASK if body is None else body)
    return {"id": RID, "identity": "profile:gw", "received": "2026-12-01T11:00:00Z", "body": text, **over}


def judged(rec: Any, owner: str = "avm-requests") -> requests.Judged:
    return requests.judge(rec, owner=owner, profiles=frozenset({"gw"}), now=NOW)


def test_a_good_request_is_pending_with_its_rule_and_reason() -> None:
    got = judged(record())
    assert got == requests.Judged(
        id=RID,
        profile="gw",
        received="2026-12-01T11:00:00Z",
        state="pending",
        reason="read v2 docs",
        rule=NameRule(host="api.example.test", port=443, methods=("GET",), paths=("/v2/*",)),
    )


@pytest.mark.parametrize(
    ("rec", "owner", "error"),
    [
        ("not a mapping", "avm-requests", "not a request id"),
        (record(id="../../etc/passwd"), "avm-requests", "not a request id"),
        (record(), "root", "not written by the recorder (owner root)"),
        (record(), "agent-gw", "not written by the recorder (owner agent-gw)"),
        (record(identity="profile:other"), "avm-requests", "identity 'profile:other' is no listener's"),
        (record(identity=""), "avm-requests", "identity '' is no listener's"),
        (record(received="yesterday"), "avm-requests", "received: not a time"),
        (
            record(body="{not json"),
            "avm-requests",
            "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (
            record(body='{"destination": "a.example", "destination": "b.example"}'),
            "avm-requests",
            "duplicate key in ['destination', 'destination']",
        ),
        (
            record(body={**ASK, "approval": {"payload": "x"}}),
            "avm-requests",
            "approval: Extra inputs are not permitted",
        ),
        (
            record(body={**ASK, "credential": {"header": "x", "ref": "secret://local/k"}}),
            "avm-requests",
            "credential: Extra inputs are not permitted",
        ),
        (
            record(body={**ASK, "methods": []}),
            "avm-requests",
            "methods: Tuple should have at least 1 item after validation, not 0",
        ),
        (
            record(body={**ASK, "methods": ["CONNECT"]}),
            "avm-requests",
            "methods.0: Input should be 'GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE' or 'OPTIONS'",
        ),
        (
            record(body={**ASK, "reason": "x" * 501}),
            "avm-requests",
            "reason: String should have at most 500 characters",
        ),
        (
            record(body={**ASK, "destination": "*"}),
            "avm-requests",
            "egress host: expected an exact name or '*.' + a name (a wildcard of the first label only), "
            "got '*'",
        ),
        (
            record(body={**ASK, "destination": "10.0.0.1"}),
            "avm-requests",
            "egress host: expected a DNS name (IP and CIDR rules go in egress.allow), got '10.0.0.1'",
        ),
        (
            record(body={**ASK, "destination": "avm.boundary"}),
            "avm-requests",
            "destination: avm.boundary is the boundary itself, not a destination",
        ),
        (
            record(body={**ASK, "destination": "api.example.test:99999"}),
            "avm-requests",
            "port: Input should be less than or equal to 65535",
        ),
        (
            record(body={**ASK, "paths": ["/v1/../admin"]}),
            "avm-requests",
            "egress path: expected a normalised path (no '..', '.', '//', '?', '#'), optionally ending "
            "in '/*' for a prefix, got '/v1/../admin'",
        ),
        (record(body="x" * (requests.MAX_BODY + 1)), "avm-requests", "body: too large"),
        ({**record(), "body": 42}, "avm-requests", "body: too large"),
    ],
)
def test_a_bad_record_is_invalid_with_its_reason_never_an_exception(rec: Any, owner: str, error: str) -> None:
    got = judged(rec, owner)
    assert (got.state, got.error, got.rule) == ("invalid", error, None)


def test_a_request_nobody_decided_on_expires() -> None:
    old = (NOW - dt.timedelta(seconds=requests.REQUEST_TTL_S + 1)).isoformat().replace("+00:00", "Z")
    assert judged(record(received=old)).state == "expired"
    recent = (NOW - dt.timedelta(seconds=requests.REQUEST_TTL_S - 1)).isoformat().replace("+00:00", "Z")
    assert judged(record(received=recent)).state == "pending"


@pytest.mark.parametrize(
    ("rule", "names"),
    [
        # the listed destination: methods and paths added, its credential kept
        (
            NameRule(host="api.example.test", methods=("GET", "PUT"), paths=("/v2/*", "/v1/*")),
            [("api.example.test", 443, ("GET", "POST", "PUT"), ("/v1/*", "/v2/*"), "x-api-key")],
        ),
        # another port of the same host is another destination: a new entry, no credential
        (
            NameRule(host="api.example.test", port=8443, methods=("GET",), paths=("/",)),
            [
                ("api.example.test", 443, ("GET", "POST"), ("/v1/*",), "x-api-key"),
                ("api.example.test", 8443, ("GET",), ("/",), None),
            ],
        ),
        # what is allowed already changes nothing
        (NameRule(host="api.example.test", methods=("GET",), paths=("/v1/*",)), None),
    ],
)
def test_grant_merges_a_request_into_the_policy(rule: NameRule, names: list[Any] | None) -> None:
    after = requests.grant(BASE, rule)
    if names is None:
        assert after == BASE and after.generation == BASE.generation
        return
    got = [
        (r.host, r.port, r.methods, r.paths, r.credential.header if r.credential else None)
        for r in after.names
    ]
    assert got == names
    assert after.generation != BASE.generation
    assert requests.grant(after, rule) == after  # idempotent


def test_the_change_digest_binds_every_part_of_the_change() -> None:
    parts = ("vm1", RID, "gw", "sha256:" + "a" * 64, "sha256:" + "b" * 64)
    digest = requests.change_digest(*parts)
    assert digest.startswith("sha256:") and len(digest) == 71
    for i in range(len(parts)):
        changed = list(parts)
        changed[i] = changed[i] + "x"
        assert requests.change_digest(*changed) != digest, i


def test_a_request_id_is_checked_before_any_lookup() -> None:
    assert requests.is_request_id(RID)
    for bad in ("rq-0123", "RQ-0123456789ABCDEF", "rq-0123456789abcdef\n", "../rq-0123456789abcdef"):
        assert not requests.is_request_id(bad)
    err = requests.request_id_error("nope")
    assert (err.code, err.exit_code, err.details) == (
        "request-id-invalid",
        64,
        {"expected": "^rq-[0-9a-f]{16}$", "actual": "nope"},
    )


def test_avm_boundary_is_not_a_destination_a_policy_may_list() -> None:
    with pytest.raises(UsageError) as err:
        parse_policy([{"host": "avm.boundary", "methods": ["GET"], "paths": ["/"]}])
    assert err.value.code == "egress-name-invalid"


def _spec(root: Path, socket: Path | None, leaves: dict[str, tuple[Path, Path]] | None = None) -> GatewaySpec:
    return GatewaySpec(
        listeners=(Listener("profile:gw", ipaddress.IPv4Address("127.100.0.7"), BASE),),
        xds_dir=root / "xds",
        admin_socket=root / "admin.sock",
        access_log=root / "access.log",
        trusted_ca=root / "ca.pem",
        leaves=leaves or {"api.example.test": (root / "leaf.pem", root / "leaf.key")},
        secrets={"secret://local/k": root / "k"},
        requests_socket=socket,
    )


def _deny_bodies(doc: Any) -> list[dict[str, Any]]:
    """Every 403 body Envoy answers with: direct responses, and the RBAC denials' local replies."""
    found: list[dict[str, Any]] = []
    if isinstance(doc, dict):
        body = doc.get("direct_response", {}).get("body", {}).get("inline_string")
        if body and doc["direct_response"]["status"] == 403:
            found.append(json.loads(body))
        if doc.get("status_code") == 403 and "json_format" in doc.get("body_format_override", {}):
            found.append(doc["body_format_override"]["json_format"])
        for v in doc.values():
            found += _deny_bodies(v)
    elif isinstance(doc, list):
        for v in doc:
            found += _deny_bodies(v)
    return found


def test_the_boundary_listener_answers_policy_itself_and_routes_requests_to_the_recorder() -> None:
    root = Path("/srv/gw")
    rendered = render(_spec(root, root / "requests.sock"))
    by_name = {x["name"]: x for x in rendered.lds["resources"]}
    assert sorted(by_name) == ["profile:gw/443", "profile:gw/80"]
    boundary = by_name["profile:gw/80"]
    assert boundary["address"] == {"socket_address": {"address": "127.100.0.7", "port_value": 80}}
    hcm = boundary["filter_chains"][0]["filters"][0]["typed_config"]
    host, other = hcm["route_config"]["virtual_hosts"]
    assert host["domains"] == ["avm.boundary"] and other["domains"] == ["*"]
    policy, ask, rest = host["routes"]
    assert policy["match"] == {
        "path": "/policy",
        "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
    }
    assert json.loads(policy["direct_response"]["body"]["inline_string"]) == requests.policy_view(
        "profile:gw", BASE
    )
    view = requests.policy_view("profile:gw", BASE)
    assert view["names"] == [
        {
            "host": "api.example.test",
            "port": 443,
            "methods": ["GET", "POST"],
            "paths": ["/v1/*"],
            "credential_header": "x-api-key",
        }
    ]
    assert "secret://" not in json.dumps(view)  # the ref is not the agent's business
    assert ask["route"] == {"cluster": "avm|requests", "timeout": "5s"}
    # the identity header comes from the listener, overwriting whatever the agent sent
    assert ask["request_headers_to_add"] == [
        {
            "header": {"key": "x-avm-identity", "value": "profile:gw"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
    assert rest["direct_response"]["status"] == 404
    assert hcm["http_filters"][0]["typed_config"]["max_request_bytes"] == requests.MAX_BODY
    recorder = next(c for c in rendered.cds["resources"] if c["name"] == "avm|requests")
    endpoint = recorder["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint == {"address": {"pipe": {"path": "/srv/gw/requests.sock"}}}
    # every denial of every chain tells the agent how to ask
    bodies = _deny_bodies(rendered.lds)
    assert len(bodies) == 4  # method, path, host on the 443 chain; the wrong Host on avm.boundary
    assert all(b["request"] == "POST http://avm.boundary/requests" for b in bodies)
    assert all(b["policy_at"] == "GET http://avm.boundary/policy" for b in bodies)


def test_without_a_recorder_nothing_changes_for_tier2_jobs() -> None:
    root = Path("/srv/gw")
    rendered = render(_spec(root, None))
    assert [x["name"] for x in rendered.lds["resources"]] == ["profile:gw/443"]
    bodies = _deny_bodies(rendered.lds)
    assert len(bodies) == 3 and all("request" not in b for b in bodies)
    assert rendered.generation != render(_spec(root, root / "requests.sock")).generation


def test_a_name_on_the_boundarys_port_is_refused() -> None:
    root = Path("/srv/gw")
    on80 = EgressPolicy(names=(NameRule(host="api.example.test", port=80, methods=("GET",), paths=("/",)),))
    spec = dataclasses.replace(
        _spec(root, root / "requests.sock"),
        listeners=(Listener("profile:gw", ipaddress.IPv4Address("127.100.0.7"), on80),),
    )
    with pytest.raises(UsageError) as err:
        render(spec)
    assert err.value.code == "gateway-listener-invalid"
    assert err.value.details["expected"] == "no name on port 80 (avm.boundary's)"


def test_the_tier1_hosts_file_names_avm_boundary_and_the_table_opens_its_port() -> None:
    gw = tier1.render_host(
        {"gw": BASE}, ca_cert=b"ca", ca_fingerprint="sha256:" + "0" * 64, tiers={"gw": "L1"}
    )
    assert gw is not None
    hosts = next(f for f in gw.files if f.path == "/etc/avm/boundary/gw/hosts")
    addr = gw.addresses["gw"]
    assert hosts.data.decode() == f"127.0.0.1 localhost\n{addr} api.example.test\n{addr} avm.boundary\n"
    script = tier1.nft_script(gw, {"gw": 1234}, {})
    assert f"ip daddr {addr} tcp dport {{ 443, 80 }} accept" in script
    assert gw.policy_record() == {
        "gw": {"names": BASE.model_dump(mode="json")["names"], "ip_rules": [], "tier": "L1"}
    }


def test_the_rendering_with_the_boundary_listener_passes_envoy_validate(tmp_path: Path) -> None:
    ca = EgressCA.ensure(tmp_path / "ca")
    (tmp_path / "k").write_bytes(b"x")
    spec = _spec(tmp_path, tmp_path / "requests.sock", {"api.example.test": ca.leaf("api.example.test")})
    spec = dataclasses.replace(spec, trusted_ca=ca.cert_path)
    envoy.validate(render(spec))  # raises gateway-config-invalid if Envoy refuses it
    assert api.ASK == {"request": requests.ASK, "policy_at": requests.READ}
