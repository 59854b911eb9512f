"""Job networks for real: namespaces, nftables and packets (needs root; rules are in test_egress_rules).

The integration tests need root. Traffic stays inside namespaces the tests create: a "world"
namespace holds the servers (TEST-NET-2 addresses on its loopback) and the outer veth end; a
simulated guest namespace replaces the tap (``guest_link="veth"``) so the very same table is
exercised by real packets. The production tap path is created and torn down as well.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from controlplane._internal.netns import Ip, netns_pids
from controlplane.errors import OperationalError, UsageError
from controlplane.jobs.egress import network as egress
from controlplane.jobs.egress.names import POOL, Names, block, candidate_blocks
from controlplane.jobs.spec import EgressRule
from controlplane.transport.local import LocalTransport

needs_root = pytest.mark.usefixtures("root_net_tools")
LABEL = f"t{os.getpid() % 100000}"
ALLOWED, DNS = "198.51.100.10", "198.51.100.53"


def rule(host: str, port: int = 443, proto: str = "tcp") -> SimpleNamespace:
    return SimpleNamespace(host=host, port=port, proto=proto)


SERVER = textwrap.dedent(
    """
    import json, selectors, socket, sys
    sel, hits = selectors.DefaultSelector(), open(sys.argv[2], "a", buffering=1)
    for host, port, proto, tag in json.loads(sys.argv[1]):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        if proto == "tcp":
            s.listen(8)
        sel.register(s, selectors.EVENT_READ, (proto, tag))
    print("ready", flush=True)
    while True:
        for key, _ in sel.select(timeout=120):
            proto, tag = key.data
            if proto == "tcp":
                conn, _ = key.fileobj.accept()
                conn.sendall(tag.encode()); conn.close()
            else:
                _, peer = key.fileobj.recvfrom(512)
                key.fileobj.sendto(tag.encode(), peer)
            hits.write(tag + "\\n")
    """
)
SERVICES = [
    (ALLOWED, 8080, "tcp", "allowed"),
    (ALLOWED, 8081, "tcp", "wrong-port"),
    ("198.51.100.20", 8080, "tcp", "unlisted"),
    (DNS, 53, "udp", "dns-listed"),
    ("198.51.100.54", 53, "udp", "dns-unlisted"),
]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A namespace standing in for the outside world, with the test's servers in it."""
    name, hits = f"avmtw-{os.getpid()}", tmp_path / "hits"
    sh("ip", "netns", "add", name)
    server = None
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        for addr in sorted({s[0] for s in SERVICES}):
            sh("ip", "-n", name, "addr", "add", f"{addr}/32", "dev", "lo")
        argv = ["ip", "netns", "exec", name, sys.executable, "-c", SERVER, json.dumps(SERVICES), str(hits)]
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield name, hits
    finally:
        if server is not None:
            server.kill()
            server.wait()
        egress.gc(LABEL, uplink_netns=name)
        subprocess.run(["ip", "netns", "del", name], check=False)


def host_ipv4() -> str:
    return next(a for a, _ in Ip(LocalTransport()).ipv4_addrs() if not a.startswith("127."))


@needs_root
def test_real_packets_are_allowed_or_denied_and_counted(world: tuple[str, Path]) -> None:
    world_ns, hits = world
    rules = [EgressRule(host=ALLOWED, port=8080), EgressRule(host=DNS, port=53, proto="udp")]
    with egress.job_network("probe-1", rules, LABEL, guest_link="veth", uplink_netns=world_ns) as net:
        guest = net.guest_netns
        assert guest is not None
        assert net.guest_env == {
            "AVM_NET_ADDR": f"{net.guest_addr}/30",
            "AVM_NET_GW": net.gateway,
            "AVM_NET_DNS": DNS,
        }
        assert sh("ip", "-n", net.netns, "-6", "addr") == ""  # IPv6 is off on every job-side link
        mac = json.loads(sh("ip", "-j", "-n", net.netns, "link", "show", "dev", net.tap))[0]["address"]
        sh("ip", "-n", guest, "-6", "addr", "add", "fd00:a5::2/64", "dev", "eth0", "nodad")
        sh(
            "ip",
            "-n",
            guest,
            "-6",
            "neigh",
            "replace",
            "fd00:a5::1",
            "lladdr",
            mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        )
        cases = [  # (target, reached, the counter that must move)
            ((ALLOWED, 8080, "tcp"), True, "allowed"),
            ((DNS, 53, "udp"), True, "allowed"),
            ((ALLOWED, 8081, "tcp"), False, "denied_other"),
            (("198.51.100.20", 8080, "tcp"), False, "denied_other"),
            (("198.51.100.54", 53, "udp"), False, "denied_dns"),
            (("169.254.169.254", 80, "tcp"), False, "denied_metadata"),
            ((net.uplink_addr, 22, "tcp"), False, "denied_host"),
            ((net.gateway, 22, "tcp"), False, "denied_host"),
            ((host_ipv4(), 22, "tcp"), False, "denied_host"),
            ((ALLOWED, 0, "icmp"), False, "denied_icmp"),
            (("fd00:a5::1", 80, "tcp"), False, "denied_ipv6"),
        ]
        for target, reached, counter in cases:
            before = net.counters()
            [result] = egress.probe_targets(guest, [target], timeout=1.0)
            after = net.counters()
            assert result["reached"] is reached, (target, result)
            assert after[counter]["packets"] > before[counter]["packets"], (target, counter)
            if not reached:
                assert after["allowed"] == before["allowed"], target
            if not reached and counter != "denied_ipv6":  # reject: the guest learns at once
                assert result["elapsed_s"] < 0.5, result
        burst = egress.probe_targets(guest, [(ALLOWED, 9000 + i, "tcp") for i in range(20)], timeout=1.0)
        assert all(not r["reached"] and r["elapsed_s"] < 0.5 for r in burst), burst  # no ICMP rate limit
        assert [r["answer"] for r in egress.probe_targets(guest, [cases[0][0], cases[1][0]])] == [
            "allowed",
            "dns-listed",
        ]
        denied = {(d["daddr"], d["proto"], d["dport"]): d["class"] for d in net.denials()}
        assert denied[(ALLOWED, "tcp", 8081)] == "denied_other"
        assert denied[("198.51.100.54", "udp", 53)] == "denied_dns"
        assert denied[("169.254.169.254", "tcp", 80)] == "denied_metadata"
        assert net.spec.table not in sh("nft", "list", "tables")  # the host's own ruleset is untouched
        sh("ip", "-n", world_ns, "route", "add", f"{net.guest_addr}/32", "via", str(net.block[5]))
        inbound_before = net.counters()["denied_inbound"]["packets"]
        [inbound] = egress.probe_targets(world_ns, [(net.guest_addr, 22, "tcp")], timeout=0.5)
        assert not inbound["reached"] and net.counters()["denied_inbound"]["packets"] > inbound_before
    assert sorted(set(hits.read_text().split())) == ["allowed", "dns-listed"]  # the servers agree
    assert all(ok for _, ok, _ in net.teardown_checks()), net.teardown_checks()
    assert net.counters()["denied_metadata"]["packets"] >= 1  # the snapshot outlives the namespace
    assert egress.leftovers("probe-1", LABEL, uplink_netns=world_ns) == []


@needs_root
def test_tap_path_is_created_and_torn_down_even_when_the_job_fails() -> None:
    with (
        pytest.raises(RuntimeError, match="job failed"),
        egress.job_network("tap-1", [rule(ALLOWED)], LABEL) as net,
    ):
        link = json.loads(sh("ip", "-d", "-j", "-n", net.netns, "link", "show", "dev", net.tap))[0]
        assert link["linkinfo"]["info_kind"] == "tun" and link["linkinfo"]["info_data"]["type"] == "tap"
        netdev = f"tap,id=n0,ifname={net.tap},script=no,downscript=no"
        assert net.qemu_args == ["-netdev", netdev, "-device", "virtio-net-device,netdev=n0"]
        assert net.qemu_args_for("q35")[-1] == "virtio-net-pci,netdev=n0"
        assert net.host_dev in sh("ip", "-br", "link")  # the outer veth end is in the host namespace
        assert net.counters()["allowed"] == {"packets": 0, "bytes": 0}
        raise RuntimeError("job failed")
    assert [name for name, ok, _ in net.teardown_checks() if not ok] == []
    gone = subprocess.run(["ip", "-n", net.netns, "link"], capture_output=True, text=True, check=False)
    assert (gone.returncode, gone.stderr) == (
        255,
        f'Cannot open network namespace "{net.netns}": No such file or directory\n',
    )
    assert net.host_dev not in sh("ip", "-br", "link")
    assert egress.leftovers("tap-1", LABEL) == []


@needs_root
def test_nft_table_gone_is_observed_in_the_namespace_and_can_fail() -> None:
    # the table is deleted from the job namespace's own ruleset before the namespace goes: observed
    with egress.job_network("nft-ok", [rule(ALLOWED)], LABEL) as net:
        pass
    checks = {name: (ok, detail) for name, ok, detail in net.teardown_checks(wait=0)}
    assert checks["nft-table-gone"] == (
        True,
        f"table {net.spec.table} deleted from {net.netns}'s own ruleset (rc 0); tables left there: []",
    )
    assert checks["tap-gone"][0] and checks["nft-table-not-in-host"][0]
    # a table that is not where it must be (removed behind avm's back) fails the check
    with (
        pytest.raises(OperationalError) as exc,
        egress.job_network("nft-gone", [rule(ALLOWED)], LABEL) as net,
    ):
        sh("ip", "netns", "exec", net.netns, "nft", "delete", "table", "inet", net.spec.table)
    failed = [c for c in exc.value.details["checks"] if not c[1]]
    assert [c[0] for c in failed] == ["nft-table-gone"], failed
    assert egress.leftovers("nft-gone", LABEL) == []


@needs_root
def test_a_taken_block_is_skipped_by_its_name() -> None:
    names = Names.of("claim-1", LABEL)
    first = next(candidate_blocks(names, POOL, []))
    squatter = names.host_dev(first)  # another runner holds this job's first-choice block
    sh("ip", "link", "add", squatter, "type", "veth", "peer", "name", f"{LABEL}-sq")
    try:
        with egress.job_network("claim-1", [rule(ALLOWED)], LABEL) as net:
            assert net.host_dev != squatter and net.block != block(POOL, first)
    finally:
        subprocess.run(["ip", "link", "del", squatter], check=False)
    assert egress.leftovers("claim-1", LABEL) == []


KILLED = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    from types import SimpleNamespace
    from controlplane.jobs.egress import network as egress
    rules = [SimpleNamespace(host="198.51.100.10", port=80, proto="tcp")]
    net = egress.open_network(sys.argv[1], rules, sys.argv[2])
    orphan = ["ip", "netns", "exec", net.netns, "sleep", "600"]  # a QEMU that outlives its runner
    subprocess.Popen(orphan, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(net.netns, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@needs_root
def test_gc_removes_what_a_killed_runner_left() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED, "kill-1", LABEL], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    netns = proc.stdout.strip()
    time.sleep(0.1)  # let the orphan enter the namespace
    pids = netns_pids(LocalTransport(), netns)
    left = egress.leftovers("kill-1", LABEL)
    assert f"netns {netns}" in left and any(x.startswith(f"link {LABEL}--") for x in left), left
    assert pids, "the orphaned job process should still run in the namespace"
    with pytest.raises(OperationalError) as err:
        egress.open_network("kill-1", [], LABEL)
    assert err.value.code == "egress-netns-exists"
    removed = egress.gc(LABEL)
    assert f"netns {netns}" in removed
    assert egress.leftovers("kill-1", LABEL) == []
    time.sleep(0.1)
    assert not any(
        Path(f"/proc/{pid}").exists() and "sleep" in Path(f"/proc/{pid}/cmdline").read_text() for pid in pids
    )


@needs_root
@pytest.mark.parametrize(
    ("host", "code"),
    [("0.0.0.0/0", "egress-allow-all"), ("169.254.169.254", "egress-metadata"), ("", "egress-host-address")],
)
def test_bad_rules_create_nothing(host: str, code: str) -> None:
    host = host or host_ipv4()  # the host's own address: always denied, so refused up front
    before = sh("ip", "netns", "list"), sh("ip", "-br", "link")
    with pytest.raises(UsageError) as err, egress.job_network("bad-1", [rule(host)], LABEL):
        pytest.fail("a job network was created for a bad rule")
    assert err.value.code == code
    assert (sh("ip", "netns", "list"), sh("ip", "-br", "link")) == before
