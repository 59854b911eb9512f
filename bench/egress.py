"""The egress gateway, measured side by side in one run (real Envoy, real TLS, real namespaces).

* latency: keep-alive HTTPS GETs, sequential, to the test upstream directly (from the gateway's
  namespace) and through the gateway (from the agent's namespace: TLS termination, routes,
  credential injection, re-originated verified TLS); p50/p99 and the difference;
* hot reload: ``Gateway.apply`` of a changed policy, in total (render + ``envoy --mode validate``
  + files + admin polling) and from the first rename to the new generation in force;
* gateway memory (RSS) with 1 listener and with 50 (one identity and address each), and the time
  to add the 51st listener;
* budgets and usage (with ``--budgets``): keep-alive requests through the gateway as shipped
  (the Lua token reader in every chain), with that filter removed (a bench-only rendering), and
  with a request and a byte budget (the byte budget buffers each request): a GET answered with
  a usage object and a POST of 4 KiB, p50/p99;
* Tier-2 (with ``--jobs``, needs the golden image): a deny-all job vs the same job listing a name,
  (a) with the host's gateway already running (a listener added by a file update) and (b) with no
  gateway running (the job starts it: what a per-job gateway costs); median of N each.

    python bench/egress.py [-n 500] [--budgets] [--jobs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # tests.plugins: the same namespaces as the tests

from controlplane._internal.netns import Ip
from controlplane.boundary.ca import EgressCA
from controlplane.boundary.gateway import Gateway
from controlplane.boundary.hostgw import HostGatewayOptions
from controlplane.boundary.policy import EgressPolicy, parse_policy
from controlplane.boundary.render import GatewaySpec, Listener
from controlplane.home import Home
from controlplane.transport.local import LocalTransport
from tests.plugins.boundarynet import AGENT_ADDR, UPSTREAM_ADDR, BoundaryNet, Client, make_boundary_net

HOST, REF = "api.example.test", "secret://local/bench-key"


def policy(port: int, extra: str = "") -> EgressPolicy:
    paths = ["/v1/models", *([extra] if extra else [])]
    cred = {"header": "x-api-key", "ref": REF}
    return parse_policy(
        [{"host": HOST, "port": port, "methods": ["GET"], "paths": paths, "credential": cred}]
    )


def spec(
    net: BoundaryNet, gw: Gateway, ca: EgressCA, listeners: tuple[Listener, ...], sec: Path
) -> GatewaySpec:
    return GatewaySpec(
        listeners=listeners, **gw.paths(), trusted_ca=net.up_ca.cert_path,
        leaves={HOST: ca.leaf(HOST)}, secrets={REF: sec},
        upstreams={f"{HOST}:{net.upstream_port}": (UPSTREAM_ADDR, net.upstream_port)},
        uplink_netns=Path(f"/run/netns/{net.gw}"),
    )  # fmt: skip


def latency(client: Client, addr: str, port: int, n: int) -> tuple[float, float]:
    conn = client.connection(addr, port, HOST)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            conn.request("GET", "/v1/models")
            resp = conn.getresponse()
            resp.read()
            out.append(time.perf_counter() - t)
            assert resp.status == 200, resp.status
    finally:
        conn.close()
    out.sort()
    return statistics.median(out) * 1000, out[int(len(out) * 0.99) - 1] * 1000


def timed(
    client: Client, port: int, n: int, method: str, path: str, body: bytes | None
) -> tuple[float, float]:
    conn = client.connection(AGENT_ADDR, port, HOST)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as a real client: no Nagle stall
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            resp.read()
            out.append(time.perf_counter() - t)
            assert resp.status == 200, resp.status
    finally:
        conn.close()
    out.sort()
    return statistics.median(out) * 1000, out[int(len(out) * 0.99) - 1] * 1000


def budget_rows(net: BoundaryNet, n: int) -> list[tuple[str, str]]:
    from controlplane.boundary import render

    rows: list[tuple[str, str]] = []
    ca = EgressCA.ensure(net.tmp / "egress-ca-budget")
    port = net.upstream_port
    entry: dict[str, object] = {"host": HOST, "port": port, "methods": ["GET", "POST"], "paths": ["/v1/*"]}
    budget = {"requests_per_minute": 100_000, "request_bytes_per_minute": (1 << 32) - 1}
    shipped = render._http_filters

    def without_lua(spec_: GatewaySpec, rule: object) -> list[dict[str, object]]:
        return [f for f in shipped(spec_, rule) if f["name"] != "envoy.filters.http.lua"]  # type: ignore[arg-type]

    body = b"x" * 4096
    for label, pol, filters in (
        ("as shipped (Lua token reader)", parse_policy([entry]), shipped),
        ("without the Lua filter (bench only)", parse_policy([entry]), without_lua),
        ("with request + byte budgets", parse_policy([{**entry, "budget": budget}]), shipped),
    ):
        render._http_filters = filters  # type: ignore[assignment]
        try:
            with Gateway(net.tmp / f"gw-{len(rows)}", netns=net.gw) as gw:
                sec = gw.put_secret(REF, b"unused")
                me = Listener(
                    "test:agent", ipaddress.IPv4Address(AGENT_ADDR), pol, Path(f"/run/netns/{net.ag}")
                )
                gw.start(spec(net, gw, ca, (me,), sec))
                client = Client(net.ag, ca.cert_path)
                get = timed(client, port, n, "GET", "/v1/chat/completions", None)
                post = timed(client, port, n, "POST", "/v1/chat/completions", body)
        finally:
            render._http_filters = shipped
        rows.append((f"{label}: GET with usage / POST 4 KiB, p50 (p99) ms",
                     f"{get[0]:.2f} ({get[1]:.2f}) / {post[0]:.2f} ({post[1]:.2f})"))  # fmt: skip
    return rows


def gateway_rows(net: BoundaryNet, n: int) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    ca = EgressCA.ensure(net.tmp / "egress-ca")
    port = net.upstream_port
    with Gateway(net.tmp / "gw", netns=net.gw) as gw:
        sec = gw.put_secret(REF, b"sk-bench-" + secrets.token_hex(8).encode())
        me = Listener(
            "test:agent", ipaddress.IPv4Address(AGENT_ADDR), policy(port), Path(f"/run/netns/{net.ag}")
        )
        t = time.perf_counter()
        gw.start(spec(net, gw, ca, (me,), sec))
        rows.append(("gateway start to generation in force (s)", f"{time.perf_counter() - t:.3f}"))
        t = time.perf_counter()
        gw.stop()
        rows.append(("gateway stop (s)", f"{time.perf_counter() - t:.3f}"))
        t = time.perf_counter()
        gw.launch()
        rows.append(("gateway restart on its files to in force (s)", f"{time.perf_counter() - t:.3f}"))
        direct = latency(Client(net.gw, net.up_ca.cert_path), UPSTREAM_ADDR, port, n)
        via = latency(Client(net.ag, ca.cert_path), AGENT_ADDR, port, n)
        direct2 = latency(Client(net.gw, net.up_ca.cert_path), UPSTREAM_ADDR, port, n)  # drift check
        rows.append(
            (
                f"direct p50 / p99 (ms, n={n}, run twice)",
                f"{direct[0]:.2f} / {direct[1]:.2f}; {direct2[0]:.2f} / {direct2[1]:.2f}",
            )
        )
        rows.append(("via gateway p50 / p99 (ms): TLS + routes + injection", f"{via[0]:.2f} / {via[1]:.2f}"))
        base = min(direct[0], direct2[0])
        rows.append(("added by the gateway p50 (ms)", f"{via[0] - base:.2f}"))
        totals, in_force = [], []
        for i in range(6):
            changed = Listener(me.identity, me.address, policy(port, f"/v1/extra{i}"), me.netns)
            t = time.perf_counter()
            reload = gw.apply(spec(net, gw, ca, (changed,), sec))
            totals.append(time.perf_counter() - t)
            in_force.append(reload.seconds)
        rows.append(("hot reload: apply total, median of 6 (ms)", f"{statistics.median(totals) * 1000:.0f}"))
        rows.append(
            ("hot reload: first rename to in force, median (ms)", f"{statistics.median(in_force) * 1000:.0f}")
        )
        rows.append(("gateway RSS, 1 listener (MiB)", f"{gw.process.rss_bytes() / 2**20:.1f}"))
        many = [changed]
        inner = Ip(LocalTransport(), net.ag)
        for i in range(1, 51):
            inner.run("addr", "add", f"10.77.1.{i}/32", "dev", "lo")
            many.append(
                Listener(f"test:job{i}", ipaddress.IPv4Address(f"10.77.1.{i}"), policy(port), me.netns)
            )
        t = time.perf_counter()
        gw.apply(spec(net, gw, ca, tuple(many[:50]), sec))
        rows.append(("apply: 1 -> 50 listeners (ms)", f"{(time.perf_counter() - t) * 1000:.0f}"))
        time.sleep(1.0)
        rows.append(("gateway RSS, 50 listeners (MiB)", f"{gw.process.rss_bytes() / 2**20:.1f}"))
        t = time.perf_counter()
        reload = gw.apply(spec(net, gw, ca, tuple(many), sec))
        rows.append(
            (
                "add the 51st listener: total / in force (ms)",
                f"{(time.perf_counter() - t) * 1000:.0f} / {reload.seconds * 1000:.0f}",
            )
        )
    return rows


@contextlib.contextmanager
def resident_gateway(home: Home, net: BoundaryNet, opts: HostGatewayOptions) -> Iterator[None]:
    """Keep the host's gateway running across the jobs: a listener of a stand-in identity."""
    from controlplane.boundary.hostgw import job_listener

    inner = Ip(LocalTransport(), net.ag)
    if "10.77.2.1" not in [a for a, _ in inner.ipv4_addrs()]:
        inner.run("addr", "add", "10.77.2.1/32", "dev", "lo")
    with job_listener(
        home, "resident", policy(net.upstream_port), ipaddress.IPv4Address("10.77.2.1"), net.ag, opts
    ):
        yield


def job_rows(net: BoundaryNet, n: int) -> list[tuple[str, str]]:
    from controlplane.evidence import keys
    from controlplane.governance import secrets as store
    from controlplane.image import sign as imagesign
    from controlplane.jobs.oci import store as ocistore
    from controlplane.jobs.runner import run_job
    from controlplane.jobs.spec import load_jobspec
    from controlplane.release import cosign
    from controlplane.release import trust as signing

    base = net.tmp / "jobs"
    home = Home(base / "home").ensure()
    keys.init(home)
    private, public = cosign.generate_keypair(b"pw")
    (base / "cosign.pub").write_bytes(public)
    signing.trust_release_key(home, base / "cosign.pub", "bench")
    image = ocistore.build_job_image(
        home, "bench/hello", {}, busybox=Path(shutil.which("busybox") or "/bin/busybox")
    )
    imagesign.sign_image(home, image.name, image.digest, private, b"pw")
    store.put(home, REF, b"sk-bench")
    names = [{"host": HOST, "port": net.upstream_port, "methods": ["GET"], "paths": ["/v1/models"],
              "credential": {"header": "x-api-key", "ref": REF}}]  # fmt: skip
    opts = HostGatewayOptions(
        root=base / "gw", netns=net.gw, trusted_ca=net.up_ca.cert_path,
        upstreams={f"{HOST}:{net.upstream_port}": (UPSTREAM_ADDR, net.upstream_port)},
    )  # fmt: skip

    def run(kind: str, egress: dict[str, object]) -> float:
        doc = {"id": f"bench-{kind}", "image": image.ref, "command": ["/bin/sh", "-c", "echo hi"],
               "timeout": 120, "risk_tier": "L1", "egress": egress}  # fmt: skip
        path = base / f"{kind}.json"
        path.write_text(json.dumps(doc))
        t = time.perf_counter()
        result = run_job(home, load_jobspec(path), spec_dir=base,
                         network_options={"uplink_netns": net.gw, "gateway": opts})  # fmt: skip
        assert result.status == "ok", (result.stdout, result.stderr)
        return time.perf_counter() - t

    run("warm", {})  # image rootfs cache, kernel pick
    deny: list[float] = []
    cold: list[float] = []
    warm: list[float] = []
    ip: list[float] = []
    for _ in range(n):  # interleaved, so load on the machine drifts into all of them alike
        deny.append(run("deny", {}))
        ip.append(run("ip", {"allow": [{"host": "198.51.100.7", "port": 443}]}))  # the job network alone
        cold.append(run("names", {"names": names}))  # no gateway running: the job starts it
        with resident_gateway(home, net, opts):
            warm.append(run("names", {"names": names}))
    d, c, w, i = (statistics.median(x) for x in (deny, cold, warm, ip))
    return [
        (f"Tier-2 deny-all job, median of {n} (s)", f"{d:.3f}"),
        ("Tier-2 job with one IP rule: job network, no gateway (s)", f"{i:.3f} (+{i - d:.3f})"),
        ("Tier-2 names job, host gateway running: listener by file update (s)", f"{w:.3f} (+{w - d:.3f})"),
        ("Tier-2 names job, no gateway running: the job starts one (s)", f"{c:.3f} (+{c - d:.3f})"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=500, help="requests per latency series")
    parser.add_argument(
        "--jobs", type=int, default=0, help="Tier-2 jobs per kind (0: skip; needs the golden image)"
    )
    parser.add_argument("--budgets", action="store_true", help="also measure budgets and the usage filter")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/egress.py needs root (network namespaces)")
    with tempfile.TemporaryDirectory(prefix="avm-bench-egress-") as tmp, make_boundary_net(Path(tmp)) as net:
        rows = gateway_rows(net, args.n)
        if args.budgets:
            rows += budget_rows(net, args.n)
        if args.jobs:
            os.environ.setdefault("AVM_IMAGE_CACHE", "/var/tmp/avm-image-cache")
            rows += job_rows(net, args.jobs)
    width = max(len(k) for k, _ in rows)
    print(f"{'measure'.ljust(width)}  value")
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
