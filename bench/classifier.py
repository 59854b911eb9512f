"""The content gate's added latency, measured side by side in one run (real Envoy, real TLS,
real namespaces, the reference classifier as its own process).

For a 4 KiB and a 64 KiB JSON body (clean: the request is forwarded): keep-alive HTTPS POSTs,
sequential, through the gateway to the test upstream, first to a name without inspection, then
to the same name with ``inspect: true`` (the body buffered, sent to ``classifyd`` over HTTP,
the verdict routed on); p50/p99 and the difference. Also ``classify()`` alone per body (the
detector's own cost, in process).

    python bench/classifier.py [-n 300]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.plugins: the tests' namespaces

from controlplane.boundary.ca import EgressCA
from controlplane.boundary.classify import classify
from controlplane.boundary.contentgate import Classifier
from controlplane.boundary.gateway import Gateway
from controlplane.boundary.policy import parse_policy
from controlplane.boundary.render import GatewaySpec, Listener
from tests.plugins.boundarynet import AGENT_ADDR, UPSTREAM_ADDR, BoundaryNet, Client, make_boundary_net

HOST, CLS = "api.example.test", ("127.0.0.1", 19390)


def body(size: int) -> bytes:
    words = "the release notes describe the build of the golden image and its sandbox "
    text = (words * (size // len(words) + 1))[: size - 40]
    return json.dumps({"messages": [{"role": "user", "content": text}]}).encode()[:size].ljust(size)


def spec(net: BoundaryNet, gw: Gateway, ca: EgressCA, inspect: bool) -> GatewaySpec:
    entry = {"host": HOST, "port": net.upstream_port, "methods": ["POST"], "paths": ["/v1/messages"]}
    if inspect:
        entry |= {"inspect": True, "max_sensitivity": "internal"}
    listener = Listener(
        "test:bench", ipaddress.IPv4Address(AGENT_ADDR), parse_policy([entry]), Path(f"/run/netns/{net.ag}")
    )
    return GatewaySpec(
        listeners=(listener,), **gw.paths(), trusted_ca=net.up_ca.cert_path,
        leaves={HOST: ca.leaf(HOST)}, secrets={},
        upstreams={f"{HOST}:{net.upstream_port}": (UPSTREAM_ADDR, net.upstream_port)},
        uplink_netns=Path(f"/run/netns/{net.gw}"), classifier=Classifier(CLS) if inspect else None,
    )  # fmt: skip


def series(client: Client, port: int, data: bytes, n: int) -> list[float]:
    conn = client.connection(AGENT_ADDR, port, HOST)
    conn.connect()  # headers and body are two writes: no 40 ms delayed-ACK stall on the second
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            conn.request("POST", "/v1/messages", body=data, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            out.append(time.perf_counter() - t)
            assert resp.status == 200, resp.status
    finally:
        conn.close()
    return out


def p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def rows(net: BoundaryNet, n: int) -> list[tuple[str, str]]:
    ca = EgressCA.ensure(net.tmp / "egress-ca")
    client = Client(net.ag, ca.cert_path)
    argv = ["ip", "netns", "exec", net.gw, sys.executable, "-m", "controlplane.boundary.classifyd"]
    proc = subprocess.Popen(
        [*argv, "--listen", f"{CLS[0]}:{CLS[1]}"],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    out: list[tuple[str, str]] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        (net.tmp / "gw").mkdir(mode=0o700)
        with Gateway(net.tmp / "gw", netns=net.gw) as gw:
            gw.start(spec(net, gw, ca, inspect=False))
            for size in (4096, 65536):
                data = body(size)
                gw.apply(spec(net, gw, ca, inspect=False))
                series(client, net.upstream_port, data, 20)  # warm
                plain = series(client, net.upstream_port, data, n)
                gw.apply(spec(net, gw, ca, inspect=True))
                series(client, net.upstream_port, data, 20)
                held = series(client, net.upstream_port, data, n)
                t = time.perf_counter()
                for _ in range(50):
                    classify(data)
                alone = (time.perf_counter() - t) / 50 * 1000
                kib = f"{size // 1024} KiB"
                out += [
                    (
                        f"{kib} POST, no inspection p50 / p99",
                        f"{p(plain, 0.5):.2f} / {p(plain, 0.99):.2f} ms",
                    ),
                    (f"{kib} POST, inspect: true p50 / p99", f"{p(held, 0.5):.2f} / {p(held, 0.99):.2f} ms"),
                    (f"{kib} added by the classifier (p50)", f"{p(held, 0.5) - p(plain, 0.5):+.2f} ms"),
                    (f"{kib} classify() alone (mean of 50)", f"{alone:.2f} ms"),
                ]
                net.upstream_log.write_text("")
    finally:
        proc.kill()
        proc.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=300, help="requests per latency series")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="avm-bench-cls-") as tmp, make_boundary_net(Path(tmp)) as net:
        table = rows(net, args.n)
    width = max(len(k) for k, _ in table)
    print(f"{'measure'.ljust(width)}  value")
    for key, value in table:
        print(f"{key.ljust(width)}  {value}")
    print(f"({args.n} requests per series, sequential, one keep-alive connection; 20 warm-up first)")


if __name__ == "__main__":
    main()
