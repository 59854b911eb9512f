"""One gateway per host: a listener per job, added and removed by file updates, never a restart.

Real Envoy and real namespaces (tests/plugins/boundarynet.py); the "jobs" are listeners in the
agent's namespace on addresses of their own, as a job's is on its own link.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from controlplane._internal.netns import Ip
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
