"""The egress gateway for real: Envoy from the pinned wheel, real TLS, a real upstream.

Each test makes its own namespaces (tests/plugins/boundarynet.py): the agent's namespace has no
link and no route at all, the gateway's listener is bound inside it, and the test upstream
``api.example.test`` (its own test CA) lives in a third namespace reached only by Envoy.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.boundary import events
from controlplane.boundary.ca import EgressCA
from controlplane.boundary.gateway import Gateway
from controlplane.boundary.policy import EgressPolicy, parse_policy
from controlplane.boundary.render import GatewaySpec, Listener
from controlplane.errors import OperationalError
from tests.plugins.boundarynet import AGENT_ADDR, UPSTREAM_ADDR, BoundaryNet, Client, socket_in

KEY_REF, KEY = "secret://local/api-key", b"sk-test-" + b"7" * 24
HOST = "api.example.test"


def policy(port: int, paths: tuple[str, ...] = ("/v1/messages", "/v1/models")) -> EgressPolicy:
    return parse_policy(
        [
            {
                "host": HOST,
                "port": port,
                "methods": ["GET", "POST"],
                "paths": list(paths),
                "credential": {"header": "x-api-key", "ref": KEY_REF},
            }
        ]
    )


class Setup:
    def __init__(self, net: BoundaryNet) -> None:
        self.net = net
        self.port = net.upstream_port
        self.ca = EgressCA.ensure(net.tmp / "egress-ca")
        self.gw = Gateway(net.tmp / "gw", netns=net.gw)
        self.secrets = {KEY_REF: self.gw.put_secret(KEY_REF, KEY)}
        self.client = Client(net.ag, self.ca.cert_path)

    def spec(self, pol: EgressPolicy, *extra: Listener) -> GatewaySpec:
        mine = Listener(
            "test:agent", ipaddress.IPv4Address(AGENT_ADDR), pol, Path(f"/run/netns/{self.net.ag}")
        )
        listeners = (mine, *extra)
        hosts = {r.host for x in listeners for r in x.policy.names}
        return GatewaySpec(
            listeners=listeners,
            **self.gw.paths(),
            trusted_ca=self.net.up_ca.cert_path,
            leaves={h: self.ca.leaf(h) for h in hosts},
            secrets=self.secrets,
            upstreams={f"{HOST}:{self.port}": (UPSTREAM_ADDR, self.net.upstream_port)},
            uplink_netns=Path(f"/run/netns/{self.net.gw}"),
        )

    def get(self, path: str, method: str = "GET", **headers: str) -> Any:
        return self.client.https(AGENT_ADDR, self.port, HOST, method, path, headers)


@pytest.fixture
def setup(boundary_net: BoundaryNet) -> Iterator[Setup]:
    s = Setup(boundary_net)
    with s.gw:
        yield s


def upstream_headers(resp: Any) -> list[list[str]]:
    assert resp.status == 200, resp.body
    return [h for h in resp.json()["headers"] if h[0] == "x-api-key"]


def test_listed_request_gets_the_credential_the_agent_never_had(setup: Setup) -> None:
    setup.gw.start(setup.spec(policy(setup.port)))
    resp = setup.get("/v1/models")
    assert upstream_headers(resp) == [["x-api-key", KEY.decode()]]
    assert resp.json()["path"] == "/v1/models"
    forged = setup.get("/v1/models", **{"x-api-key": "sk-forged"})
    assert upstream_headers(forged) == [["x-api-key", KEY.decode()]]
    seen = setup.net.upstream_requests()
    assert [r["path"] for r in seen] == ["/v1/models", "/v1/models"]
    assert not any("sk-forged" in json.dumps(r) for r in seen)
    # nothing about the agent's side travels upstream
    assert not [
        h for r in seen for h in r["headers"] if h[0].startswith("x-envoy") or h[0] == "x-forwarded-for"
    ]


@pytest.mark.parametrize(
    ("method", "path", "headers", "reason"),
    [
        ("DELETE", "/v1/models", {}, "method-not-allowed"),
        ("GET", "/v1/admin", {}, "path-not-allowed"),
        ("GET", "/v1/models/../admin", {}, "path-not-allowed"),
        ("GET", "/v1/models", {"host": "evil.example.test"}, "host-not-allowed"),
    ],
)
def test_denied_request_gets_403_with_the_reason(
    setup: Setup, method: str, path: str, headers: dict[str, str], reason: str
) -> None:
    pol = policy(setup.port)
    setup.gw.start(setup.spec(pol))
    resp = setup.get(path, method, **headers)
    assert resp.status == 403
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {
        "denied": True,
        "reason": reason,
        "destination": f"{HOST}:{setup.port}",
        "policy": pol.generation,
    }
    assert setup.net.upstream_requests() == []
    logged = events.read(setup.gw.access_log, timeout=5.0, want=1)
    assert [(e.event, e.identity, e.method, e.code, e.reason, e.policy) for e in logged] == [
        ("egress.denied", "test:agent", method, 403, reason, pol.generation)
    ]
    # the decision was Envoy's RBAC filter's (not a route's): its own counters say so
    stats = setup.gw.admin.stats(r"^http\.egress_api\.example\.test_\d+\.rbac\.(allowed|denied)$")
    assert {k.rsplit(".", 1)[1]: v for k, v in stats.items()} == {"allowed": 0, "denied": 1}


def test_unlisted_name_gets_no_tls_session(setup: Setup) -> None:
    setup.gw.start(setup.spec(policy(setup.port)))
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        setup.client.https(AGENT_ADDR, setup.port, "other.example.test", "GET", "/v1/models")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):  # no SNI at all
        setup.client.https(AGENT_ADDR, setup.port, "10.77.0.1", "GET", "/v1/models")
    assert setup.net.upstream_requests() == []


def test_killed_gateway_lets_nothing_out_and_restarts_with_the_same_generation(setup: Setup) -> None:
    first = setup.gw.start(setup.spec(policy(setup.port)))
    assert setup.get("/v1/models").status == 200
    setup.gw.kill()
    with pytest.raises(ConnectionRefusedError):
        socket_in(setup.net.ag, AGENT_ADDR, setup.port)
    with pytest.raises(OSError) as direct:  # and the upstream itself is unreachable from the agent
        socket_in(setup.net.ag, UPSTREAM_ADDR, setup.net.upstream_port, timeout=2.0)
    assert direct.value.errno == errno.ENETUNREACH
    again = setup.gw.launch()
    assert again.generation == first.generation
    assert again.listeners == first.listeners
    assert upstream_headers(setup.get("/v1/models")) == [["x-api-key", KEY.decode()]]


def test_rotated_secret_is_used_without_a_restart(setup: Setup) -> None:
    setup.gw.start(setup.spec(policy(setup.port)))
    pid = setup.gw.process.pid
    assert upstream_headers(setup.get("/v1/models")) == [["x-api-key", KEY.decode()]]
    setup.gw.put_secret(KEY_REF, b"sk-rotated-2")
    deadline = time.monotonic() + 10
    while upstream_headers(setup.get("/v1/models")) != [["x-api-key", "sk-rotated-2"]]:
        assert time.monotonic() < deadline, "the rotated secret was not used within 10 s"
        time.sleep(0.1)
    assert setup.gw.process.pid == pid and setup.gw.process.running()


def test_hot_reload_is_in_force_per_the_admin_interface(setup: Setup) -> None:
    old = policy(setup.port)
    setup.gw.start(setup.spec(old))
    pid = setup.gw.process.pid
    assert setup.get("/v1/other").status == 403
    new = policy(setup.port, ("/v1/messages", "/v1/models", "/v1/other"))
    reload = setup.gw.apply(setup.spec(new))
    assert reload.before != reload.after
    state = setup.gw.in_force()
    assert state.generation == reload.after
    assert state.listeners == {f"test:agent/{setup.port}": new.generation}
    assert setup.get("/v1/other").status == 200
    assert setup.gw.process.pid == pid


def test_rejected_update_keeps_the_last_good_generation(setup: Setup) -> None:
    good = setup.gw.start(setup.spec(policy(setup.port)))
    # valid to `envoy --mode validate`, refused when applied: the address is not on that namespace
    stray = Listener(
        "test:stray",
        ipaddress.IPv4Address("10.77.0.9"),
        policy(setup.port),
        Path(f"/run/netns/{setup.net.ag}"),
    )
    with pytest.raises(OperationalError) as err:
        setup.gw.apply(setup.spec(policy(setup.port), stray))
    assert err.value.code == "gateway-reload-rejected"
    assert err.value.details["why"] == "Envoy rejected lds.json"
    assert err.value.details["in_force"] == good.generation
    assert err.value.details["refused"] not in ("", good.generation)
    state = setup.gw.in_force()
    assert state.generation == good.generation
    assert state.listeners == good.listeners
    assert upstream_headers(setup.get("/v1/models")) == [["x-api-key", KEY.decode()]]


def test_invalid_rendering_is_refused_before_anything_is_written(setup: Setup, tmp_path: Path) -> None:
    spec = setup.spec(policy(setup.port))
    broken = GatewaySpec(**{**spec.__dict__, "trusted_ca": tmp_path / "missing-ca.pem"})
    with pytest.raises(OperationalError) as err:
        setup.gw.start(broken)
    assert err.value.code == "gateway-config-invalid"
    assert not setup.gw.xds_dir.exists()
    assert not setup.gw.process.running()
