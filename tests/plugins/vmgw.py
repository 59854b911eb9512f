"""The Tier-1 boundary's test parts on a golden VM with a real guest kernel (the qemu and
libvirt backends; tests/test_gateway_qemu.py, tests/test_gateway_libvirt.py). A module defines
``golden_vm`` (its VM's name); these fixtures build on it and on tests/plugins/tier1gw.py.

The test upstream listens on this machine's loopback; the guest reaches it through QEMU user
networking at 10.0.2.2 (slirp's alias of the host's 127.0.0.1), pinned in the target's gateway
options. Probes run as the agent's user inside its unit: its mount and network namespaces and
its cgroup (so under the unit's cgroup-BPF ``IPAddressDeny=`` too). That the boundary table is
what refuses is shown three ways: the same connect as root succeeds, the table's per-profile
drop counter counts the agent's packets (the OUTPUT hook runs before the cgroup's egress
filter), and the agent's bare uid in the SSH session's cgroup (no BPF there) is refused too.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from controlplane.errors import OperationalError
from controlplane.home import Home
from tests.plugins.tier1gw import agent_argv, as_agent, on_host, promote, receipt_of, serve_upstream

SLIRP_HOST = "10.0.2.2"  # the host's 127.0.0.1 as the guest sees it
UPSTREAM_PORT = 19100 + int.from_bytes(os.urandom(1)) % 50  # this helper's range: 19100-19199
RESOLVER_PORT = UPSTREAM_PORT + 50
CONNECT = r"""
import socket, sys
s = socket.socket(); s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("connected")
except socket.timeout:
    print("timeout")
except OSError as e:
    print("errno %d" % e.errno)
"""
SEND_UDP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2]))); print("sent")
except OSError as e:
    print("errno %d" % e.errno)
"""
RESOLVE = r"""
import socket, sys
try:
    print(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 443, socket.AF_INET)}))
except OSError as e:
    print("error: %s" % e)
"""


@pytest.fixture(scope="module")
def vm_upstream(
    tmp_path_factory: pytest.TempPathFactory, golden_home: Home, golden_vm: str
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("qe-upstream")
    with serve_upstream(
        root, golden_home, golden_vm, listen="127.0.0.1", reach=SLIRP_HOST, port=UPSTREAM_PORT
    ) as up:
        yield up


@pytest.fixture(scope="module")
def vm_resolver() -> Iterator[socket.socket]:
    """An "outside resolver" the test owns: a UDP socket on this machine's loopback."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", RESOLVER_PORT))
    sock.settimeout(30)
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def vm_applied(
    golden_home: Home, gw_repo: dict[str, Any], golden_vm: str, vm_upstream: dict[str, Any]
) -> dict[str, Any]:
    t0 = time.monotonic()
    rc, doc = promote(golden_home, gw_repo, "good", golden_vm, "--apply")
    assert rc == 0, doc
    print(f"promote --apply (gateway, table, probes) on {golden_vm}: {time.monotonic() - t0:.1f} s")
    return receipt_of(golden_home, doc["receipts"]["apply"])


def run_as(home: Home, vm: str, who: str, script: str, *args: str) -> str:
    """``script`` run by python3 as ``who``: "unit" (the agent inside its unit, cgroup
    included), "uid" (the agent's uid and network namespace, the SSH session's cgroup) or
    "root" (root in the unit's network namespace)."""
    if who == "root":
        pid = on_host(home, vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw").strip()
        prefix = ["nsenter", "-t", pid, "-n", "--"]
    else:
        prefix = agent_argv(home, vm, cgroup=who == "unit", netns_only=who == "uid")
    return on_host(home, vm, *prefix, "python3", "-c", script, *args).strip()


def dropped(home: Home, vm: str) -> int:
    """Packets the table's ``denied-gw`` counter has dropped for the agent's uid."""
    out = on_host(home, vm, "nft", "list", "counter", "inet", "avm_boundary", "denied-gw")
    found = re.search(r"packets (\d+) bytes", out)
    assert found is not None, out
    return int(found.group(1))


def direct_ip_refused_by_the_table(home: Home, vm: str, upstream: dict[str, Any]) -> dict[str, Any]:
    """The upstream's own address and port, straight: root connects; the agent (in its unit, and
    as its bare uid) does not, and each refusal is on the table's counter."""
    target = (upstream["addr"], str(upstream["port"]))
    before = dropped(home, vm)
    root = run_as(home, vm, "root", CONNECT, *target, "20")
    after_root = dropped(home, vm)
    unit = run_as(home, vm, "unit", CONNECT, *target, "3")
    after_unit = dropped(home, vm)
    uid = run_as(home, vm, "uid", CONNECT, *target, "3")
    after_uid = dropped(home, vm)
    return {
        "root": root,
        "root_dropped": after_root - before,
        "unit": unit,
        "unit_dropped_some": after_unit > after_root,
        "uid": uid,
        "uid_dropped_some": after_uid > after_unit,
    }


REFUSED_DIRECT = {
    "root": "connected",
    "root_dropped": 0,
    "unit": "timeout",  # the SYN dropped (and retransmitted until the timeout)
    "unit_dropped_some": True,
    "uid": "timeout",
    "uid_dropped_some": True,
}


def boot_id(home: Home, vm: str) -> str:
    return on_host(home, vm, "cat", "/proc/sys/kernel/random/boot_id").strip()


def unit_times(home: Home, vm: str, unit: str, *props: str) -> dict[str, str]:
    out = on_host(home, vm, "systemctl", "show", "-p", ",".join(props), unit)
    return dict(line.split("=", 1) for line in out.splitlines())


def wait_new_boot(home: Home, vm: str, old_boot: str, t0: float, timeout_s: float) -> None:
    """Until SSH answers from a boot other than ``old_boot`` and the agent's unit is active."""
    while True:
        assert time.monotonic() - t0 < timeout_s, f"no SSH on the new boot within {timeout_s} s"
        try:
            if boot_id(home, vm) != old_boot:
                break
        except OperationalError as exc:
            assert exc.code in ("host-unreachable", "command-timeout"), exc
        time.sleep(2)
    is_active = ("systemctl", "is-active", "agent-gateway@gw")
    while on_host(home, vm, *is_active, check=False).strip() != "active":
        assert time.monotonic() - t0 < timeout_s, "agent-gateway@gw not active after the reboot"
        time.sleep(2)


def boundary_in_force_on_the_new_boot(home: Home, vm: str, upstream: dict[str, Any]) -> dict[str, Any]:
    """After a reboot with nothing but SSH since: ``avm-boundary.service`` loaded the table on
    this boot before the agent's unit started, the direct IP is still refused by it, the listed
    name still reached. Returns the boot's timestamps (seconds since boot) for the report."""
    boundary = unit_times(
        home, vm, "avm-boundary", "ActiveState", "Result", "ExecMainStatus", "ActiveEnterTimestampMonotonic"
    )
    agent = unit_times(home, vm, "agent-gateway@gw", "ActiveState", "ExecMainStartTimestampMonotonic")
    states = (boundary["ActiveState"], boundary["Result"], boundary["ExecMainStatus"], agent["ActiveState"])
    assert states == ("active", "success", "0", "active")
    loaded_at = int(boundary["ActiveEnterTimestampMonotonic"])
    agent_at = int(agent["ExecMainStartTimestampMonotonic"])
    assert 0 < loaded_at < agent_at  # both on this boot's clock: the table first
    script = on_host(home, vm, "cat", "/etc/avm/boundary/boundary.nft")
    uid = on_host(home, vm, "id", "-u", "agent-gw").strip()
    assert f"add element inet avm_boundary by_uid {{ {uid} : jump profile-gw }}" in script
    assert dropped(home, vm) == 0  # a table loaded on this boot: its counter is new
    assert direct_ip_refused_by_the_table(home, vm, upstream) == REFUSED_DIRECT
    got = as_agent(home, vm, "/v1/after-reboot", cgroup=True)
    assert (got["status"], got["reason"]) == (200, None)
    return {"boundary_active_s": loaded_at / 1e6, "agent_started_s": agent_at / 1e6}
