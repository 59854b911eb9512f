"""Namespaces for the gateway's real tests, made and removed by the test that uses them.

``boundary_net`` makes three namespaces named ``avmtgw-<random>-{gw,up,ag}``:
- ``up``: the test upstream ``api.example.test`` (HTTPS, its own test CA) on 192.0.2.2, also
  answering as ``models.example.test`` (a second destination);
- ``gw``: where Envoy runs (a veth to ``up``: the gateway's uplink, 192.0.2.1/30);
- ``ag``: the agent's side: its own address on loopback, no link and no route to anything, so
  the only way out is a listener the gateway binds inside it.
``client.https(...)`` makes TLS requests from inside a namespace (a thread that enters it only to
create the socket), so tests and bench measure a real client, not a stand-in.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import http.client
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane._internal.netns import Ip, delete_netns, netns_names
from controlplane.boundary.ca import EgressCA
from controlplane.transport.local import LocalTransport

CLONE_NEWNET = 0x40000000
UPSTREAM_ADDR, UPLINK_ADDR = "192.0.2.2", "192.0.2.1"
AGENT_ADDR = "10.77.0.1"
SECOND_NAME = "models.example.test"  # the upstream also answers as this name (its own leaf)
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(netns: str, addr: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside ``netns`` (the socket stays in that namespace)."""
    out: list[Any] = []

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            out.append(socket.create_connection((addr, port), timeout=timeout))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    assert isinstance(out[0], socket.socket)
    return out[0]


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """HTTPS from the agent's namespace to an address, with SNI and trust of the caller's choice."""

    def __init__(self, netns: str, cafile: Path) -> None:
        self.netns, self.cafile = netns, cafile

    def connection(self, addr: str, port: int, sni: str) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        netns = self.netns

        class Conn(http.client.HTTPSConnection):
            def connect(self) -> None:
                self.sock = ctx.wrap_socket(socket_in(netns, addr, port), server_hostname=sni)

        return Conn(sni, port, context=ctx, timeout=10)

    def https(
        self,
        addr: str,
        port: int,
        sni: str,
        method: str = "GET",
        path: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        chunked: bool = False,
    ) -> Response:
        conn = self.connection(addr, port, sni)
        try:
            if chunked:  # the body in two chunks, no content-length
                parts = iter([body[: len(body) // 2], body[len(body) // 2 :]] if body else [])
                conn.request(method, path, body=parts, headers=headers or {}, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()


@dataclasses.dataclass
class BoundaryNet:
    gw: str
    up: str
    ag: str
    tmp: Path
    up_ca: EgressCA
    upstream_port: int
    upstream_log: Path
    client: Client | None = None

    def upstream_requests(self) -> list[dict[str, Any]]:
        if not self.upstream_log.exists():
            return []
        return [json.loads(line) for line in self.upstream_log.read_text().splitlines()]


def free_port(netns: str) -> int:
    """A port in 47000-47999 that nothing listens on in ``netns`` (fresh namespaces: any is)."""
    return 47000 + secrets.randbelow(1000)


@contextlib.contextmanager
def make_boundary_net(tmp_path: Path) -> Iterator[BoundaryNet]:
    """The three namespaces and the upstream; removed (and checked gone) when the block ends."""
    host = LocalTransport()
    tag = secrets.token_hex(3)
    names = [f"avmtgw-{tag}-{s}" for s in ("gw", "up", "ag")]
    gw, up, ag = names
    proc: subprocess.Popen[bytes] | None = None
    try:
        for n in names:
            host.run(["ip", "netns", "add", n], timeout=15.0).check()
            Ip(host, n).run("link", "set", "lo", "up")
        Ip(host, gw).batch(
            [
                ["link", "add", "uplink0", "type", "veth", "peer", "name", "world0", "netns", up],
                ["addr", "add", f"{UPLINK_ADDR}/30", "dev", "uplink0"],
                ["link", "set", "uplink0", "up"],
            ]
        )
        Ip(host, up).batch(
            [["addr", "add", f"{UPSTREAM_ADDR}/30", "dev", "world0"], ["link", "set", "world0", "up"]]
        )
        Ip(host, ag).run("addr", "add", f"{AGENT_ADDR}/32", "dev", "lo")
        up_ca = EgressCA.ensure(tmp_path / "upstream-ca", common_name="upstream test CA")
        cert, key = up_ca.leaf("api.example.test")
        cert2, key2 = up_ca.leaf(SECOND_NAME)
        port = free_port(up)
        log = tmp_path / "upstream.jsonl"
        argv = ["ip", "netns", "exec", up, sys.executable, "-m", "tests.plugins.upstream_server"]
        also = ["--also", SECOND_NAME, str(cert2), str(key2)]
        proc = subprocess.Popen(
            [*argv, UPSTREAM_ADDR, str(port), str(cert), str(key), str(log), *also],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield BoundaryNet(gw, up, ag, tmp_path, up_ca, port, log)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for n in names:
            with contextlib.suppress(Exception):
                delete_netns(host, n)
        left = [n for n in netns_names(host) if n in names]
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def boundary_net(tmp_path: Path, root_net_tools: None) -> Iterator[BoundaryNet]:
    with make_boundary_net(tmp_path) as net:
        yield net
