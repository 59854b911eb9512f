"""A live job network: what the runner reads (netns, QEMU args, guest env), evidence, teardown.

Built by ``controlplane.jobs.egress.network.open_network``; ``close()`` snapshots the counters, kills what
runs in the job's namespaces, deletes them and verifies with ``teardown_checks`` that nothing
is left. Counters and denials stay readable after close (the snapshot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import time
from typing import Any, Literal

from controlplane._internal import netns as nx
from controlplane.errors import OperationalError, UsageError
from controlplane.evidence.step import Check
from controlplane.jobs.egress import rules as nftrules
from controlplane.jobs.egress.names import Names
from controlplane.transport.base import Transport

log = logging.getLogger(__name__)
_MACHINES = {"microvm": "virtio-net-device", "q35": "virtio-net-pci", "pc": "virtio-net-pci"}


@dataclasses.dataclass
class JobNetwork:
    """A live job network. Read ``netns``, ``qemu_args``, ``guest_env``; ``close()`` tears down."""

    names: Names
    host: Transport
    pool: ipaddress.IPv4Network
    spec: nftrules.RulesetSpec
    guest_link: Literal["tap", "veth"]
    uplink_netns: str | None
    host_dev: str = ""
    inode: int | None = None
    setup_s: float = 0.0
    teardown_s: float = 0.0
    closed: bool = False
    final_counters: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    final_denials: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    inside: list[Check] = dataclasses.field(default_factory=list)  # observed in the namespace at close

    @property
    def netns(self) -> str:
        return self.names.netns

    @property
    def tap(self) -> str:
        return self.names.tap

    @property
    def block(self) -> ipaddress.IPv4Network:
        """This job's /29 (a placeholder until the host-side veth has claimed one)."""
        return ipaddress.IPv4Network(f"{self.spec.guest_addr}/29", strict=False)

    @property
    def gateway(self) -> str:
        return str(self.block[1])

    @property
    def guest_addr(self) -> str:
        return str(self.block[2])

    @property
    def uplink_addr(self) -> str:  # the host side of the veth
        return str(self.block[6])

    @property
    def guest_netns(self) -> str | None:
        """The simulated guest's namespace (``guest_link="veth"``, tests only), else None."""
        return self.names.guest_netns if self.guest_link == "veth" else None

    def qemu_args_for(self, machine: str) -> list[str]:
        """QEMU NIC arguments. Raises ``UsageError('unknown-machine')`` for other machine types."""
        if machine not in _MACHINES:
            raise UsageError(
                "unknown-machine",
                f"no NIC model for machine {machine!r}: expected one of {sorted(_MACHINES)}",
                hint="use microvm (virtio-mmio) or q35 (PCI)",
            )
        netdev = f"tap,id=n0,ifname={self.tap},script=no,downscript=no"
        return ["-netdev", netdev, "-device", f"{_MACHINES[machine]},netdev=n0"]

    @property
    def qemu_args(self) -> list[str]:
        return self.qemu_args_for("microvm")

    @property
    def guest_env(self) -> dict[str, str]:
        return {
            "AVM_NET_ADDR": f"{self.guest_addr}/30",
            "AVM_NET_GW": self.gateway,
            "AVM_NET_DNS": nftrules.dns_server(self.spec.allow),
        }

    def counters(self) -> dict[str, dict[str, int]]:
        """Named counters (packets/bytes) live, or as snapshotted at teardown once closed."""
        if self.closed:
            return self.final_counters
        return nftrules.parse_counters(nx.nft_json(self.host, self.netns, "list", "counters"))

    def denials(self) -> list[dict[str, Any]]:
        """Denied destinations (daddr, proto, dport, class, packets) from the table's dynamic sets.

        Collected from nft sets, not from the kernel log (which drops log lines from non-initial
        namespaces unless the host sets ``net.netfilter.nf_log_all_netns=1``).
        """
        if self.closed:
            return self.final_denials
        out: list[dict[str, Any]] = []
        for name in ("denied_flows", "denied_hosts"):
            doc = nx.nft_json(self.host, self.netns, "list", "set", "inet", self.spec.table, name)
            out += nftrules.parse_denials(doc, self.spec.host_nets)
        return out

    def teardown_checks(self, wait: float = 3.0) -> list[Check]:
        """What must be gone after teardown, polled up to ``wait`` s (namespace destruction is async)."""
        deadline = time.monotonic() + wait
        while True:
            checks = self._checks()
            if all(ok for _, ok, _ in checks) or time.monotonic() >= deadline:
                return checks
            time.sleep(0.05)

    def _checks(self) -> list[Check]:
        mounted = set(nx.netns_names(self.host))
        left_ns = [n for n in (self.netns, self.guest_netns) if n and n in mounted]
        held = self.inode is not None and self.inode in nx.held_net_inodes(self.host)
        links = nx.Ip(self.host, self.uplink_netns).links()
        left_dev = [str(k["ifname"]) for k in links if k.get("ifalias") == self.names.alias]
        left_dev += [self.host_dev] if self.host_dev in {k["ifname"] for k in links} else []
        in_host = self.spec.table in nx.host_tables(self.host)
        inside = self.inside or [
            Check("tap-gone", False, "not observed: the namespace was not closed by this runner"),
            Check("nft-table-gone", False, "not observed: the namespace was not closed by this runner"),
        ]
        return [
            Check(
                "netns-gone",
                not left_ns,
                f"still mounted: {left_ns}" if left_ns else f"{self.netns} unmounted",
            ),
            Check("no-process-in-netns", not held, f"net namespace inode {self.inode} held={held}"),
            Check(
                "veth-gone",
                not left_dev,
                f"left: {sorted(set(left_dev))}" if left_dev else "veth pair reaped",
            ),
            *inside,
            Check(
                "nft-table-not-in-host",
                not in_host,
                f"table {self.spec.table}: in the host ruleset={in_host}",
            ),
        ]

    def _remove_inside(self) -> list[Check]:
        """Delete the tap and the table inside the namespace and list what is left there, before
        the namespace itself goes: these checks observe the namespace's own ruleset and links."""
        inner = nx.Ip(self.host, self.netns)
        nx.kill_all(self.host, nx.netns_pids(self.host, self.netns))
        inner.run("link", "del", self.tap, check=False)
        dropped = self.host.run(
            nx.in_netns(self.netns, ["nft", "delete", "table", "inet", self.spec.table]), timeout=15.0
        )
        listed = self.host.run(nx.in_netns(self.netns, ["nft", "-j", "list", "tables"]), timeout=15.0)
        tables = [
            str(i["table"]["name"])
            for i in (json.loads(listed.stdout or "{}").get("nftables", []) if listed.ok else [])
            if "table" in i
        ]
        links = [str(k["ifname"]) for k in inner.links()]
        table_ok = dropped.ok and listed.ok and self.spec.table not in tables
        return [
            Check("tap-gone", self.tap not in links, f"links left in {self.netns} before deletion: {links}"),
            Check(
                "nft-table-gone",
                table_ok,
                f"table {self.spec.table} deleted from {self.netns}'s own ruleset (rc {dropped.rc}); "
                f"tables left there: {tables}",
            ),
        ]

    def close(self, *, strict: bool = True) -> list[Check]:
        """Snapshot counters, kill what runs in the namespaces, delete them, verify.

        Raises ``OperationalError('egress-teardown-incomplete')`` (checks in ``details``) if
        something is left and ``strict``; otherwise only logs it.
        """
        if self.closed:
            return self.teardown_checks(wait=0)
        start = time.monotonic()
        with contextlib.suppress(Exception):
            self.final_counters, self.final_denials = self.counters(), self.denials()
        self.closed = True
        try:
            self.inside = self._remove_inside()
        except Exception as exc:  # a failed observation is a failed check, never a skipped one
            self.inside = [
                Check("tap-gone", False, f"check failed: {exc}"),
                Check("nft-table-gone", False, f"{exc}"),
            ]
        for name in (self.guest_netns, self.netns):
            if name:
                nx.delete_netns(self.host, name)
        if self.host_dev:  # normally already reaped with its peer
            nx.Ip(self.host, self.uplink_netns).run("link", "del", self.host_dev, check=False)
        checks = self.teardown_checks()
        self.teardown_s = time.monotonic() - start
        failed = [c for c in checks if not c[1]]
        if failed:
            err = OperationalError(
                "egress-teardown-incomplete",
                f"job network {self.netns} left: {', '.join(f'{n} ({d})' for n, _, d in failed)}",
                hint=f"run egress.gc({self.names.label!r}); a process outside may hold the namespace",
                details={"checks": [list(c) for c in checks]},
            )
            if strict:
                raise err
            log.error("%s", err)
        return checks
