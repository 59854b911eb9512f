"""The job-private network of a Tier-2 microVM job whose spec allows some egress.

Per job: a network namespace ``avm-<label>--<job_id>`` holding the tap QEMU attaches to (the
gateway, ``.1`` of a /30), one end of a veth pair (the other end, ``<tag>--<block>``, sits in the
host's namespace) and an nftables ``inet`` table (``controlplane.jobs.egress.rules``) that drops all but the
listed destinations, counts every class of traffic and rejects fast. Forwarding is on inside the
namespace only; guest traffic leaves masqueraded as the namespace's veth address. Each job takes
a /29 of ``POOL`` derived from a hash of its id; the host-side veth's name claims the block
atomically. Names carry the label, so ``gc(label)`` finds what a killed runner left behind.

``job_network`` tears down in ``finally`` and then verifies nothing is left.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from controlplane._internal import netns as nx
from controlplane.errors import OperationalError, UsageError
from controlplane.evidence.step import Check
from controlplane.jobs.egress import rules as nftrules
from controlplane.jobs.egress.live import JobNetwork
from controlplane.jobs.egress.names import POOL, Names, block, candidate_blocks, parse_label
from controlplane.jobs.egress.probe import probe_targets
from controlplane.transport.base import Transport
from controlplane.transport.local import LocalTransport

__all__ = ["POOL", "Check", "JobNetwork", "gc", "job_network", "leftovers", "open_network", "probe_targets"]


def open_network(
    job_id: str,
    rules: Sequence[Any],
    label: str,
    *,
    host: Transport | None = None,
    guest_link: Literal["tap", "veth"] = "tap",
    uplink_netns: str | None = None,
    pool: ipaddress.IPv4Network = POOL,
    gateway_ports: Sequence[int] = (),
) -> JobNetwork:
    """Create a job network; the caller must ``close()`` it (prefer ``job_network``).

    ``guest_link="veth"`` (tests) puts a simulated guest in ``net.guest_netns`` instead of a tap;
    ``uplink_netns`` puts the outer veth end in that namespace instead of the host's.
    ``gateway_ports``: TCP ports of the egress gateway's listener on the tap's own address (the
    guest may open those, nothing else on this side; names need no forwarding and no NAT).
    Raises ``UsageError`` for a bad id, label or rule, or an allow entry on a host address
    (``egress-host-address``), all before anything is created; ``OperationalError`` with code
    ``egress-netns-exists`` or ``egress-pool-exhausted``, or ``CommandFailed``, after cleaning up.
    """
    names = Names.of(job_id, label)
    allow = nftrules.validate_rules(rules)
    transport = host or LocalTransport()
    uplink = nx.Ip(transport, uplink_netns)
    host_nets = [ipaddress.IPv4Network(a) for a, _ in nx.Ip(transport).ipv4_addrs()]
    host_nets += [ipaddress.IPv4Network("127.0.0.0/8"), pool]
    for i, entry in enumerate(allow):
        if any(entry.net.overlaps(h) for h in host_nets):
            raise UsageError(
                "egress-host-address",
                f"egress allow[{i}]: expected a destination off this host, got {entry.net}",
                hint=f"host addresses, loopback and the job pool {pool} are always denied",
                details={"index": i, "expected": "not a host address", "actual": str(entry.net)},
            )
    if names.netns in nx.netns_names(transport):
        raise OperationalError(
            "egress-netns-exists",
            f"namespace {names.netns} already exists (expected none for a new job)",
            hint=f"a runner was killed: egress.gc({label!r}) removes its leftovers",
        )
    taken = [ipaddress.IPv4Network(f"{a}/{p}", strict=False) for a, p in uplink.ipv4_addrs()]
    taken += [ipaddress.IPv4Network(r) for r in uplink.ipv4_routes()] + [a.net for a in allow]
    start = time.monotonic()
    net = JobNetwork(
        names,
        transport,
        pool,
        _spec(names, block(pool, 0), host_nets, allow, tuple(gateway_ports)),
        guest_link,
        uplink_netns,
    )
    try:
        _build(net, uplink, candidate_blocks(names, pool, taken))
    except BaseException:
        net.close(strict=False)
        raise
    net.setup_s = time.monotonic() - start
    return net


def _spec(
    names: Names,
    blk: ipaddress.IPv4Network,
    host_nets: Sequence[ipaddress.IPv4Network],
    allow: tuple[nftrules.Allow, ...],
    gateway_ports: tuple[int, ...] = (),
) -> nftrules.RulesetSpec:
    own = (ipaddress.IPv4Network(blk[1]), ipaddress.IPv4Network(blk[5]), ipaddress.IPv4Network(blk[6]))
    return nftrules.RulesetSpec(
        table=names.table,
        guest_dev=names.tap,
        uplink_dev=names.uplink_dev,
        guest_addr=blk[2],
        host_nets=(*host_nets, *own),
        allow=allow,
        log_prefix=names.log_prefix,
        gateway_addr=blk[1] if gateway_ports else None,
        gateway_ports=gateway_ports,
    )


def _claim(net: JobNetwork, uplink: nx.Ip, blocks: Iterator[int]) -> None:
    """Create the veth pair under the first free block's name; "File exists" means taken."""
    for index in blocks:
        dev = net.names.host_dev(index)
        argv = ("link", "add", dev, "type", "veth", "peer", "name", net.names.uplink_dev, "netns", net.netns)
        result = uplink.run(*argv, check=False)
        if result.ok:
            net.host_dev = dev
            host_nets = net.spec.host_nets[:-3]  # drop the placeholder block's own three addresses
            net.spec = _spec(
                net.names, block(net.pool, index), host_nets, net.spec.allow, net.spec.gateway_ports
            )
            return
        if "File exists" not in result.stderr:
            result.check()
    raise OperationalError("egress-pool-exhausted", f"no free /29 left in {net.pool}", hint="run egress.gc")


def _build(net: JobNetwork, uplink: nx.Ip, blocks: Iterator[int]) -> None:
    names, t, inner = net.names, net.host, nx.Ip(net.host, net.netns)
    t.run(["ip", "netns", "add", names.netns], timeout=15.0).check()
    net.inode = nx.netns_inode(t, names.netns)
    # IPv6 off before any interface exists, so the tap and the veth end inherit it.
    nx.sysctl(t, names.netns, ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
    if net.guest_link == "veth":
        t.run(["ip", "netns", "add", names.guest_netns], timeout=15.0).check()
        inner.run(
            "link", "add", names.tap, "type", "veth", "peer", "name", "eth0", "netns", names.guest_netns
        )
    else:
        inner.run("tuntap", "add", "dev", names.tap, "mode", "tap")
    _claim(net, uplink, blocks)
    b, dev = net.block, net.host_dev
    nx.sysctl(t, uplink.netns, [f"net.ipv6.conf.{dev}.disable_ipv6=1"])
    nx.nft(
        t, names.netns, ["-f", "-"], script=nftrules.render(net.spec)
    )  # the firewall before any link is up
    uplink.batch(
        [
            ["link", "set", dev, "alias", names.alias],
            ["addr", "add", f"{b[6]}/30", "dev", dev],
            ["link", "set", dev, "up"],
        ]
    )
    inner.batch(
        [
            ["addr", "add", f"{b[1]}/30", "dev", names.tap],
            ["addr", "add", f"{b[5]}/30", "dev", names.uplink_dev],
            ["link", "set", "lo", "up"],
            ["link", "set", names.tap, "up"],
            ["link", "set", names.uplink_dev, "up"],
            ["route", "add", "default", "via", str(b[6])],
        ]
    )
    if net.guest_link == "veth":  # what the guest's init does with AVM_NET_ADDR / AVM_NET_GW
        nx.Ip(t, names.guest_netns).batch(
            [
                ["addr", "add", f"{b[2]}/30", "dev", "eth0"],
                ["link", "set", "lo", "up"],
                ["link", "set", "eth0", "up"],
                ["route", "add", "default", "via", str(b[1])],
            ]
        )
    # icmp_ratelimit=0: the rejects go to this one guest only, and a rate-limited reject turns
    # into a silent drop (the guest would wait for its timeout after ~6 quick denials).
    # forwarding only for IP allow rules: names are reached through the gateway's listener here
    forward = "1" if net.spec.allow else "0"
    nx.sysctl(t, names.netns, ["net.ipv4.icmp_ratelimit=0", f"net.ipv4.ip_forward={forward}"])


@contextlib.contextmanager
def job_network(
    job_id: str, rules: Sequence[Any], label: str, *, host: Transport | None = None, **options: Any
) -> Iterator[JobNetwork]:
    """Create the job network, yield it, and always tear it down and verify (see ``open_network``).

    Raises what ``open_network`` raises; on a clean exit also ``egress-teardown-incomplete``
    if anything is left (if the body raised, that error wins and leftovers are only logged).
    """
    net = open_network(job_id, rules, label, host=host, **options)
    ok = False
    try:
        yield net
        ok = True
    finally:
        net.close(strict=ok)


def leftovers(
    job_id: str, label: str, *, host: Transport | None = None, uplink_netns: str | None = None
) -> list[str]:
    """What of that job's network still exists (namespaces, host-side links), as readable strings."""
    names, transport = Names.of(job_id, label), host or LocalTransport()
    mounted = nx.netns_names(transport)
    out = [f"netns {n}" for n in (names.netns, names.guest_netns) if n in mounted]
    links = nx.Ip(transport, uplink_netns).links()
    return out + [f"link {link['ifname']}" for link in links if link.get("ifalias") == names.alias]


def gc(label: str, *, host: Transport | None = None, uplink_netns: str | None = None) -> list[str]:
    """Remove every job network of ``label``; run it when no runner of that label is running.

    Returns what was removed. Raises ``UsageError('invalid-egress-label')`` for a bad label.
    """
    transport, names = host or LocalTransport(), Names("x", parse_label(label))
    removed = [
        f"netns {n}"
        for n in nx.netns_names(transport)
        if n.startswith(names.netns_prefix) and nx.delete_netns(transport, n)
    ]
    uplink = nx.Ip(transport, uplink_netns)
    for link in uplink.links():
        name, alias = str(link["ifname"]), str(link.get("ifalias", ""))
        if name.startswith(f"{names.tag}--") and alias.startswith(f"avm:{label}:"):
            uplink.run("link", "del", name, check=False)  # synchronous, unlike the reaping of its peer
            removed.append(f"link {name}")
    return removed
