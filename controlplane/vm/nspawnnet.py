"""A private network per nspawn golden VM, and the Tier-1 egress rules avm installs into it.

Why (``shared/lab/substrate.md``, last section): inside an nspawn container on this
hybrid-cgroup host ``IPAddressDeny=`` (cgroup-BPF) is silently not enforced. What is enforced
is a network namespace avm makes per container: a veth pair with a /30 (host end ``.1``,
container end ``host0`` ``.2``), ``lo`` up, and the container booted with
``--network-namespace-path=/run/netns/N``. The namespace belongs to the host's user namespace,
so the container's root has no CAP_NET_ADMIN in it and cannot change its links or its
nftables ruleset; avm installs the rules from the host side, one chain per profile, matched
by the profile user's uid (``meta skuid``: the container has no user namespace, so its uids
are host uids). It also gives every nspawn VM its own address, so their SSH ports never
collide: SSH goes to the container's ``.2`` on port 22.

Everything here runs on the control host (``LocalTransport``): the namespace and its
ruleset are outside the VM by design.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from controlplane._internal import netns as nx
from controlplane.errors import OperationalError
from controlplane.evidence.step import Check
from controlplane.transport.base import Transport

POOL = ipaddress.IPv4Network("10.233.0.0/16")
GUEST_DEV = "host0"  # the container end: nspawn's own name for it
LOCK = Path("/run/avm-nspawnnet.lock")  # address allocation is serialised between avm processes
TABLE = "avm_egress"


@dataclasses.dataclass(frozen=True)
class VmNet:
    """One VM's private network, as recorded in ``VmRecord.observations['network']``."""

    netns: str
    host_dev: str
    host_addr: str
    guest_addr: str
    prefixlen: int = 30

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmNet:
        return cls(**data)


def names(vm: str, marker: str) -> tuple[str, str]:
    """(netns, host veth) for a VM: unique per boot (the marker's random token), the link
    name within the kernel's 15 characters."""
    token = hashlib.sha256(marker.encode()).hexdigest()[:8]
    return f"avm-{vm}-{token}", f"avh{token}"


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    with LOCK.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pick_block(used: Sequence[tuple[str, int]], start: int) -> ipaddress.IPv4Network:
    """The first /30 of ``POOL`` (from index ``start``, wrapping) that overlaps no address in
    ``used`` ((address, prefixlen) of the host). Pure. Raises ``OperationalError('vm-net-exhausted')``."""
    taken = [ipaddress.IPv4Interface(f"{a}/{p}").network for a, p in used]
    blocks = list(POOL.subnets(new_prefix=30))
    for i in range(len(blocks)):
        block = blocks[(start + i) % len(blocks)]
        if not any(block.overlaps(t) for t in taken):
            return block
    raise OperationalError(
        "vm-net-exhausted",
        f"no free /30 left in {POOL} for another nspawn VM",
        hint="`avm vm status` lists the VMs; `avm vm down` the ones you no longer need",
    )


def create(host: Transport, vm: str, marker: str) -> VmNet:
    """Make the VM's namespace, veth pair and /30. On any failure nothing of it is left.

    Raises ``CommandFailed`` (from ``ip``) and ``OperationalError('vm-net-exhausted')``.
    """
    ns_name, host_dev = names(vm, marker)
    with _allocation_lock():
        start = int(hashlib.sha256(marker.encode()).hexdigest()[:8], 16)
        block = pick_block(nx.Ip(host).ipv4_addrs(), start)
        hosts = list(block.hosts())
        net = VmNet(ns_name, host_dev, str(hosts[0]), str(hosts[1]))
        try:
            ip = nx.Ip(host)
            ip.run("netns", "add", ns_name)
            ip.run("link", "add", host_dev, "type", "veth", "peer", "name", GUEST_DEV, "netns", ns_name)
            ip.run("addr", "add", f"{net.host_addr}/30", "dev", host_dev)
            ip.run("link", "set", host_dev, "up")
            inner = nx.Ip(host, ns_name)
            inner.run("addr", "add", f"{net.guest_addr}/30", "dev", GUEST_DEV)
            inner.run("link", "set", GUEST_DEV, "up")
            inner.run("link", "set", "lo", "up")
        except BaseException:
            remove(host, net)
            raise
    return net


def remove(host: Transport, net: VmNet) -> list[Check]:
    """Delete the namespace (which takes the veth pair with it) and check both are gone."""
    nx.delete_netns(host, net.netns)
    # the host end normally goes with the namespace; a half-made pair may not have moved
    if any(link.get("ifname") == net.host_dev for link in nx.Ip(host).links()):
        host.run(["ip", "link", "del", net.host_dev], timeout=15.0)
    ns_left = net.netns in nx.netns_names(host)
    dev_left = any(link.get("ifname") == net.host_dev for link in nx.Ip(host).links())
    return [
        Check("netns-removed", not ns_left, f"/run/netns/{net.netns}" + (" still there" if ns_left else "")),
        Check("veth-removed", not dev_left, net.host_dev + (" still there" if dev_left else "")),
    ]


# --- Tier-1 egress rules, installed into the VM's namespace from the host side -------------


@dataclasses.dataclass(frozen=True)
class ProfileEgress:
    """What one profile may reach: its user's uid and the manifest's egress allowlist."""

    profile: str
    uid: int
    allow: tuple[tuple[str, int, str], ...]  # (host or CIDR, port, tcp|udp)


def chain_name(profile: str) -> str:
    return f"profile-{profile}"


def counter_names(profile: str) -> tuple[str, str]:
    return f"allowed-{profile}", f"denied-{profile}"


def render(profiles: Sequence[ProfileEgress]) -> str:
    """The nft script that (re)defines the chains of ``profiles`` and leaves other profiles'
    chains alone. Idempotent: ``add`` of what exists is a no-op, a chain is flushed before its
    rules are added, counters keep counting. Pure."""
    t = f"inet {TABLE}"
    lines = [
        f"add table {t}",
        f"add map {t} by_uid {{ type uid : verdict; }}",
        f"add chain {t} output {{ type filter hook output priority filter; policy accept; }}",
        f"flush chain {t} output",
        f"add rule {t} output meta skuid vmap @by_uid",
    ]
    for prof in profiles:
        chain = chain_name(prof.profile)
        allowed, denied = counter_names(prof.profile)
        lines += [
            f"add counter {t} {allowed}",
            f"add counter {t} {denied}",
            f"add chain {t} {chain}",
            f"flush chain {t} {chain}",
            # loopback is what IPAddressAllow=localhost allows: the health endpoint lives there
            f'add rule {t} {chain} ip daddr 127.0.0.0/8 accept comment "localhost"',
            f'add rule {t} {chain} ip6 daddr ::1 accept comment "localhost"',
            f'add rule {t} {chain} ct state established,related accept comment "replies"',
        ]
        for i, (dest, port, proto) in enumerate(prof.allow):
            net = ipaddress.ip_network(dest, strict=False)
            family = "ip" if net.version == 4 else "ip6"
            lines.append(
                f"add rule {t} {chain} {family} daddr {net} {proto} dport {port} "
                f'counter name "{allowed}" accept comment "allow[{i}]"'
            )
        lines += [
            f'add rule {t} {chain} counter name "{denied}" reject with icmpx type admin-prohibited '
            'comment "default deny"',
            f"add element {t} by_uid {{ {prof.uid} : jump {chain} }}",
        ]
    return "\n".join(lines) + "\n"


def install(host: Transport, netns: str, profiles: Sequence[ProfileEgress]) -> str:
    """Check the script with ``nft -c`` against the namespace's live ruleset, then load it.
    Returns the script. Raises ``CommandFailed`` (nothing is loaded when the check fails)."""
    script = render(profiles)
    nx.nft(host, netns, ["-c", "-f", "-"], script=script)
    nx.nft(host, netns, ["-f", "-"], script=script)
    return script


def read_rules(host: Transport, netns: str) -> dict[str, Any]:
    """``nft -j list table inet avm_egress`` in ``netns`` (an empty document if there is none)."""
    result = host.run(nx.in_netns(netns, ["nft", "-j", "list", "table", "inet", TABLE]), timeout=15.0)
    if not result.ok:
        return {}
    data = json.loads(result.stdout or "{}")
    return data if isinstance(data, dict) else {}


def parse_rules(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per profile, from ``read_rules``: the uid its chain is bound to, whether the chain ends in
    the default-deny reject, and its counters. Pure."""
    out: dict[str, dict[str, Any]] = {}
    counters: dict[str, int] = {}
    bound: dict[str, int] = {}
    for item in doc.get("nftables", []):
        if "counter" in item:
            counters[item["counter"]["name"]] = int(item["counter"].get("packets", 0))
        elif "map" in item and item["map"].get("name") == "by_uid":
            for uid, verdict in item["map"].get("elem", []):
                target = verdict.get("jump", {}).get("target", "") if isinstance(verdict, dict) else ""
                if target.startswith("profile-"):
                    bound[target.removeprefix("profile-")] = int(uid)
        elif "chain" in item and item["chain"]["name"].startswith("profile-"):
            out.setdefault(item["chain"]["name"].removeprefix("profile-"), {"deny_rule": False})
        elif "rule" in item and item["rule"].get("chain", "").startswith("profile-"):
            name = item["rule"]["chain"].removeprefix("profile-")
            rejects = any("reject" in e for e in item["rule"].get("expr", []))
            entry = out.setdefault(name, {"deny_rule": False})
            entry["deny_rule"] = entry["deny_rule"] or rejects
    for name, entry in out.items():
        allowed, denied = counter_names(name)
        entry.update(
            uid=bound.get(name), allowed_packets=counters.get(allowed), denied_packets=counters.get(denied)
        )
    return out
