"""The nftables ruleset of a Tier-2 job network, as pure functions: rules in, nft script out.

``validate_rules`` turns job-spec egress entries into ``Allow`` values or raises ``UsageError``
before anything is created. ``render`` builds the ``inet`` table that is loaded inside the job's
private network namespace. ``parse_counters`` and ``parse_denials`` read ``nft -j`` output back.
None of this does I/O, so it is unit-tested as tables of cases.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from controlplane.errors import UsageError

METADATA = ipaddress.IPv4Network("169.254.0.0/16")
MIN_PREFIX = 8  # an allow entry broader than a /8 is an allow-all in disguise
# Every class of traffic gets a named counter; a counter that moved is evidence for a receipt.
COUNTERS = (
    "established",  # replies and related ICMP of allowed flows
    "allowed",  # new flows to a listed destination
    "allowed_gateway",  # new connections to the egress gateway's listener on the guest's link
    "denied_metadata",  # 169.254.0.0/16: cloud metadata and link-local
    "denied_host",  # the gateway, the host side of the veth, the host's own addresses, the job pool
    "denied_icmp",  # ICMP to anything else (no ping, no traceroute)
    "denied_dns",  # port 53 to a server that is not listed
    "denied_other",  # any other unlisted destination, port or protocol
    "denied_spoof",  # a source address that is not the guest's
    "denied_inbound",  # new flows from the outside toward the guest or the namespace
    "denied_invalid",  # conntrack state invalid
    "denied_ipv6",  # all IPv6, counted at ingress before the stack drops it
    "denied_l2",  # any ethertype other than IPv4 and ARP
    "denied_local_out",  # new flows from the namespace itself (QEMU's own sockets)
)


@dataclasses.dataclass(frozen=True)
class Allow:
    """One validated allow entry: an IPv4 network, a port, a protocol."""

    net: ipaddress.IPv4Network
    port: int
    proto: Literal["tcp", "udp"]

    def __str__(self) -> str:
        return f"{self.proto}://{self.net}:{self.port}"


@dataclasses.dataclass(frozen=True)
class RulesetSpec:
    """Everything ``render`` needs; built by ``egress`` from names, the /29 block and host facts."""

    table: str
    guest_dev: str  # the tap (or, in tests, a veth) facing the guest
    uplink_dev: str  # the namespace's end of the veth to the outside
    guest_addr: ipaddress.IPv4Address
    host_nets: tuple[ipaddress.IPv4Network, ...]
    allow: tuple[Allow, ...]
    log_prefix: str
    # the egress gateway's listener on the guest's own link (names are reached only through it)
    gateway_addr: ipaddress.IPv4Address | None = None
    gateway_ports: tuple[int, ...] = ()


def _refuse(code: str, index: int, actual: object, expected: str, hint: str) -> UsageError:
    return UsageError(
        code,
        f"egress allow[{index}]: expected {expected}, got {actual!r}",
        hint=hint,
        details={"index": index, "expected": expected, "actual": str(actual)},
    )


def validate_rules(rules: Sequence[Any]) -> tuple[Allow, ...]:
    """Validate rule-like objects (``.host``, ``.port``, ``.proto``) into ``Allow`` values.

    Raises ``UsageError`` with code ``egress-rule-invalid`` (not an IP/CIDR, bad port or proto),
    ``egress-ipv6-unsupported``, ``egress-allow-all`` (a /0), ``egress-too-broad`` (shorter than
    /8), ``egress-metadata`` (169.254.0.0/16) or ``egress-special-address`` (loopback, multicast,
    unspecified, reserved).
    """
    out: list[Allow] = []
    for i, rule in enumerate(rules):
        host, port, proto = (
            getattr(rule, "host", None),
            getattr(rule, "port", None),
            getattr(rule, "proto", "tcp"),
        )
        try:
            net = ipaddress.ip_network(str(host), strict=False)
        except ValueError:
            raise _refuse(
                "egress-rule-invalid", i, host, "an IP address or CIDR", "names are resolved by the operator"
            ) from None
        if net.prefixlen == 0:
            raise _refuse("egress-allow-all", i, host, "a specific destination", "list each destination")
        if net.version == 6:
            raise _refuse(
                "egress-ipv6-unsupported", i, host, "an IPv4 destination", "all IPv6 is denied for jobs"
            )
        assert isinstance(net, ipaddress.IPv4Network)
        if net.prefixlen < MIN_PREFIX:
            raise _refuse("egress-too-broad", i, host, f"a prefix of /{MIN_PREFIX} or longer", "split it")
        if net.overlaps(METADATA):
            raise _refuse(
                "egress-metadata",
                i,
                host,
                "a destination outside 169.254.0.0/16",
                "metadata is never allowed",
            )
        if net.is_loopback or net.is_multicast or net.is_unspecified or net.is_reserved:
            raise _refuse(
                "egress-special-address", i, host, "a unicast destination", "use a routable address"
            )
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise _refuse("egress-rule-invalid", i, port, "a port in 1..65535", "fix the port")
        if proto not in ("tcp", "udp"):
            raise _refuse("egress-rule-invalid", i, proto, "proto 'tcp' or 'udp'", "fix the proto")
        out.append(Allow(net, port, "udp" if proto == "udp" else "tcp"))
    return tuple(out)


def dns_server(allow: Sequence[Allow]) -> str:
    """The first listed single-address UDP port-53 destination, or "" when DNS is not allowed."""
    for entry in allow:
        if entry.port == 53 and entry.proto == "udp" and entry.net.num_addresses == 1:
            return str(entry.net.network_address)
    return ""


def _elements(nets: Sequence[ipaddress.IPv4Network]) -> str:
    return ", ".join(str(n.network_address) if n.prefixlen == 32 else str(n) for n in nets)


def render(spec: RulesetSpec) -> str:
    """The nft script for one job (load with ``nft -f -`` inside the job's namespace)."""
    g, u = f'"{spec.guest_dev}"', f'"{spec.uplink_dev}"'
    hosts = sorted(ipaddress.collapse_addresses(spec.host_nets))
    counters = "".join(f"  counter {name} {{ }}\n" for name in COUNTERS)
    allows = "".join(
        f"    ip daddr {_elements([a.net])} {a.proto} dport {a.port} "
        f'counter name "allowed" accept comment "allow[{i}] {a}"\n'
        for i, a in enumerate(spec.allow)
    )
    ports = ", ".join(map(str, spec.gateway_ports))
    gateway = (
        f"    iifname {g} ip daddr {spec.gateway_addr} tcp dport {{ {ports} }} "
        'ct state new counter name "allowed_gateway" accept\n'
        if spec.gateway_addr is not None and spec.gateway_ports
        else ""
    )
    return (
        f"table inet {spec.table} {{\n"
        f"{counters}"
        f"  set host_addrs {{ type ipv4_addr; flags interval; elements = {{ {_elements(hosts)} }} }}\n"
        "  set denied_flows { type ipv4_addr . inet_proto . inet_service; flags dynamic, timeout; "
        "timeout 1d; size 4096; counter; }\n"
        "  set denied_hosts { type ipv4_addr . inet_proto; flags dynamic, timeout; "
        "timeout 1d; size 4096; counter; }\n"
        f"  chain ingress {{ type filter hook ingress device {g} priority -500; policy accept;\n"
        '    meta protocol ip6 counter name "denied_ipv6" drop\n'
        '    meta protocol != { ip, arp } counter name "denied_l2" drop\n'
        "  }\n"
        "  chain input { type filter hook input priority filter; policy drop;\n"
        '    iif "lo" accept\n'
        '    meta nfproto ipv6 counter name "denied_ipv6" drop\n'
        '    ct state established,related counter name "established" accept\n'
        f'    iifname {g} ip saddr != {spec.guest_addr} counter name "denied_spoof" drop\n'
        f"{gateway}"
        f'    iifname {g} counter name "denied_host" goto deny\n'
        '    counter name "denied_inbound" drop\n'
        "  }\n"
        "  chain forward { type filter hook forward priority filter; policy drop;\n"
        '    meta nfproto ipv6 counter name "denied_ipv6" drop\n'
        '    ct state established,related counter name "established" accept\n'
        '    ct state invalid counter name "denied_invalid" drop\n'
        f'    iifname != {g} counter name "denied_inbound" drop\n'
        f'    ip saddr != {spec.guest_addr} counter name "denied_spoof" drop\n'
        f'    ip daddr {METADATA} counter name "denied_metadata" goto deny\n'
        '    ip daddr @host_addrs counter name "denied_host" goto deny\n'
        f'    oifname != {u} counter name "denied_other" goto deny\n'
        '    meta l4proto icmp counter name "denied_icmp" goto deny\n'
        f"{allows}"
        '    meta l4proto { tcp, udp } th dport 53 counter name "denied_dns" goto deny\n'
        '    counter name "denied_other" goto deny\n'
        "  }\n"
        "  chain output { type filter hook output priority filter; policy accept;\n"
        f'    oifname {u} ct state new counter name "denied_local_out" drop\n'
        "  }\n"
        "  chain deny {\n"
        f'    limit rate 10/second burst 20 packets log prefix "{spec.log_prefix}" level info\n'
        "    meta l4proto { tcp, udp } update @denied_flows { ip daddr . meta l4proto . th dport }\n"
        "    meta l4proto != { tcp, udp } update @denied_hosts { ip daddr . meta l4proto }\n"
        "    reject with icmpx type admin-prohibited\n"
        "  }\n"
        "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
        f"    oifname {u} ip saddr {spec.guest_addr} masquerade\n"
        "  }\n"
        "}\n"
    )


def _items(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [item for item in doc.get("nftables", []) if isinstance(item, Mapping)]


def parse_counters(doc: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``nft -j list counters`` -> {name: {"packets": n, "bytes": n}}."""
    out: dict[str, dict[str, int]] = {}
    for item in _items(doc):
        counter = item.get("counter")
        if isinstance(counter, Mapping) and "name" in counter:
            out[str(counter["name"])] = {"packets": int(counter["packets"]), "bytes": int(counter["bytes"])}
    return out


def classify(daddr: str, proto: str, dport: int | None, host_nets: Sequence[ipaddress.IPv4Network]) -> str:
    """The counter class the forward chain gives a denied destination (same order as ``render``)."""
    addr = ipaddress.IPv4Address(daddr)
    if addr in METADATA:
        return "denied_metadata"
    if any(addr in net for net in host_nets):
        return "denied_host"
    if proto in ("icmp", "1"):
        return "denied_icmp"
    return "denied_dns" if dport == 53 else "denied_other"


def parse_denials(doc: Mapping[str, Any], host_nets: Sequence[ipaddress.IPv4Network]) -> list[dict[str, Any]]:
    """``nft -j list set`` of ``denied_flows``/``denied_hosts`` -> one dict per denied destination."""
    out: list[dict[str, Any]] = []
    for item in _items(doc):
        nft_set = item.get("set")
        if not isinstance(nft_set, Mapping):
            continue
        for raw in nft_set.get("elem", []):
            elem = raw.get("elem", raw) if isinstance(raw, Mapping) else {"val": raw}
            val = elem.get("val")
            parts = val.get("concat", []) if isinstance(val, Mapping) else []
            if len(parts) < 2:
                continue
            daddr, proto = str(parts[0]), str(parts[1])
            dport = int(parts[2]) if len(parts) > 2 else None
            counter = elem.get("counter") or {}
            out.append(
                {
                    "daddr": daddr,
                    "proto": proto,
                    "dport": dport,
                    "class": classify(daddr, proto, dport, host_nets),
                    "packets": int(counter.get("packets", 0)),
                    "bytes": int(counter.get("bytes", 0)),
                }
            )
    return sorted(out, key=lambda d: (d["daddr"], d["proto"], d["dport"] or 0))
