"""One gateway per host: a listener per job, added and removed by file updates, never a restart.

Real Envoy and real namespaces (tests/plugins/boundarynet.py); the "jobs" are listeners in the
agent's namespace on addresses of their own, as a job's is on its own link.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import stat
from pathlib import Path

from controlplane._internal.netns import Ip
from controlplane.boundary import envoy, hostclassifier
from controlplane.boundary.hostgw import HostGatewayOptions, job_listener
from controlplane.boundary.policy import parse_policy
from controlplane.governance import secrets as secret_store
from controlplane.home import Home
from controlplane.transport.local import LocalTransport
from tests.plugins.boundarynet import UPSTREAM_ADDR, BoundaryNet, Client

REF = "secret://local/hostgw-key"


def test_jobs_share_one_gateway_and_each_gets_only_its_own_listener(
    boundary_net: BoundaryNet, tmp_path: Path
) -> None:
    net = boundary_net
    home = Home(tmp_path / "home").ensure()
    secret_store.put(home, REF, b"sk-hostgw-1")
    port = net.upstream_port
    pol = parse_policy(
        [{"host": "api.example.test", "port": port, "methods": ["GET"], "paths": ["/v1/models"],
          "credential": {"header": "x-api-key", "ref": REF}}]
    )  # fmt: skip
    opts = HostGatewayOptions(
        root=tmp_path / "gw", netns=net.gw, trusted_ca=net.up_ca.cert_path,
        upstreams={f"api.example.test:{port}": (UPSTREAM_ADDR, port)},
    )  # fmt: skip
    a, b = ipaddress.IPv4Address("10.77.3.1"), ipaddress.IPv4Address("10.77.3.2")
    for addr in (a, b):
        Ip(LocalTransport(), net.ag).run("addr", "add", f"{addr}/32", "dev", "lo")
    with job_listener(home, "job-a", pol, a, net.ag, opts) as first:
        client = Client(net.ag, first.ca.cert_path)
        assert first.started_gateway is True
        pid = first.gateway.process.pid
        with job_listener(home, "job-b", pol, b, net.ag, opts) as second:
            assert second.started_gateway is False  # added by a file update
            assert second.gateway.in_force().listeners == {
                f"job:job-a/{port}": pol.generation,
                f"job:job-b/{port}": pol.generation,
            }
            for addr in (a, b):
                resp = client.https(str(addr), port, "api.example.test", "GET", "/v1/models")
                assert [h for h in resp.json()["headers"] if h[0] == "x-api-key"] == [
                    ["x-api-key", "sk-hostgw-1"]
                ]
            assert [(e.identity, e.event) for e in second.events()] == [("job:job-b", "egress.allowed")]
        # job-b's listener is gone, job-a's still serves, on the same Envoy
        assert first.gateway.in_force().listeners == {f"job:job-a/{port}": pol.generation}
        assert first.gateway.process.pid == pid
        assert client.https(str(a), port, "api.example.test", "GET", "/v1/models").status == 200
    state = json.loads((tmp_path / "gw" / "state.json").read_text())
    assert state == {"listeners": {}, "pid": None}
    assert not first.gateway.process.running()
    assert list((tmp_path / "gw" / "secrets").iterdir()) == []


def test_a_job_listener_with_an_inspected_name_runs_the_classifier_and_fails_closed_without_it(
    boundary_net: BoundaryNet, tmp_path: Path
) -> None:
    """The job gateway starts its classifier (a socket in its own 0700 dir) before the listener,
    enforces the ceiling on its verdict, denies when it died, and stops it with the listener."""
    net = boundary_net
    home = Home(tmp_path / "home").ensure()
    port = net.upstream_port
    pol = parse_policy(
        [{"host": "api.example.test", "port": port, "methods": ["POST"], "paths": ["/v1/messages"],
          "inspect": True, "max_sensitivity": "internal"}]
    )  # fmt: skip
    root = tmp_path / "gw"
    opts = HostGatewayOptions(
        root=root, netns=net.gw, trusted_ca=net.up_ca.cert_path,
        upstreams={f"api.example.test:{port}": (UPSTREAM_ADDR, port)},
    )  # fmt: skip
    addr = ipaddress.IPv4Address("10.77.3.5")
    Ip(LocalTransport(), net.ag).run("addr", "add", f"{addr}/32", "dev", "lo")
    card = b'{"note": "card 4111 1111 1111 1111"}'
    with job_listener(home, "job-c", pol, addr, net.ag, opts) as gw:
        sock = hostclassifier.socket_path(root)
        assert sock.is_socket() and hostclassifier.running(root)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        client = Client(net.ag, gw.ca.cert_path)
        post = {"content-type": "application/json"}
        over = client.https(str(addr), port, "api.example.test", "POST", "/v1/messages", post, card)
        assert (over.status, over.json()["reason"]) == (403, "sensitivity-exceeds-ceiling")
        assert over.headers["x-avm-findings"] == "card"
        clean = client.https(
            str(addr), port, "api.example.test", "POST", "/v1/messages", post, b'{"q": "hi"}'
        )
        assert clean.status == 200
        assert [r["path"] for r in net.upstream_requests()] == ["/v1/messages"]  # the card never left
        pid = int((root / "classifier" / "pid").read_text())
        os.killpg(pid, signal.SIGKILL)
        assert envoy.wait_until(lambda: not hostclassifier.running(root), 10.0, 0.05)
        dead = client.https(str(addr), port, "api.example.test", "POST", "/v1/messages", post, b'{"q": "hi"}')
        assert (dead.status, dead.json()["reason"]) == (403, "classifier-unavailable")
        assert len(net.upstream_requests()) == 1  # fail closed: nothing passed unasked
        seen = [(e.event, e.reason, e.findings) for e in gw.events()]
        assert seen == [
            ("classifier.denied", "sensitivity-exceeds-ceiling", ("card",)),
            ("egress.allowed", "allowed", ()),
            ("egress.denied", "classifier-unavailable", ()),
        ]
        assert "4111" not in gw.gateway.access_log.read_text()
    assert not sock.exists() and not (root / "classifier" / "pid").exists()
    assert not hostclassifier.running(root)
