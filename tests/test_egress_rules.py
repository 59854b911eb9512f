"""Job-network rules, names and the rendered nftables ruleset: pure functions, no I/O."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from controlplane.errors import UsageError
from controlplane.jobs.egress import rules as nftrules
from controlplane.jobs.egress.names import Names
from controlplane.jobs.spec import EgressRule

DNS = "198.51.100.53"


def rule(host: str, port: Any = 443, proto: str = "tcp") -> SimpleNamespace:
    return SimpleNamespace(host=host, port=port, proto=proto)


@pytest.mark.parametrize(
    ("host", "port", "proto", "code"),
    [
        ("example.com", 443, "tcp", "egress-rule-invalid"),
        ("0.0.0.0/0", 443, "tcp", "egress-allow-all"),
        ("::/0", 443, "tcp", "egress-allow-all"),
        ("2001:db8::1", 443, "tcp", "egress-ipv6-unsupported"),
        ("10.0.0.0/7", 443, "tcp", "egress-too-broad"),
        ("169.254.169.254", 80, "tcp", "egress-metadata"),
        ("169.0.0.0/8", 80, "tcp", "egress-metadata"),
        ("127.0.0.1", 80, "tcp", "egress-special-address"),
        ("224.0.0.251", 5353, "udp", "egress-special-address"),
        ("198.51.100.1", 0, "tcp", "egress-rule-invalid"),
        ("198.51.100.1", 65536, "tcp", "egress-rule-invalid"),
        ("198.51.100.1", True, "tcp", "egress-rule-invalid"),
        ("198.51.100.1", 80, "icmp", "egress-rule-invalid"),
    ],
)
def test_bad_rules_are_refused_with_a_code(host: str, port: Any, proto: str, code: str) -> None:
    with pytest.raises(UsageError) as err:
        nftrules.validate_rules([rule(host, port, proto)])
    assert err.value.code == code
    assert err.value.details["actual"] and err.value.details["expected"] and err.value.hint


def test_jobspec_rules_validate_and_render() -> None:
    allow = nftrules.validate_rules(
        [EgressRule(host="198.51.100.0/24", port=443), EgressRule(host=DNS, port=53, proto="udp")]
    )
    spec = nftrules.RulesetSpec(
        table="avm_x",
        guest_dev="l-tap",
        uplink_dev="l-up",
        guest_addr=ipaddress.IPv4Address("10.231.0.2"),
        host_nets=tuple(ipaddress.IPv4Network(n) for n in ("192.0.2.2", "10.231.0.0/16", "10.231.0.1")),
        allow=allow,
        log_prefix="avm-l avm_x deny: ",
    )
    text = nftrules.render(spec)
    lines = [line.strip() for line in text.splitlines()]
    assert 'ip daddr 198.51.100.0/24 tcp dport 443 counter name "allowed" accept comment' in text
    assert f'ip daddr {DNS} udp dport 53 counter name "allowed" accept comment' in text
    assert "elements = { 10.231.0.0/16, 192.0.2.2 }" in text  # collapsed: the gateway is in the pool
    assert "type filter hook forward priority filter; policy drop;" in text
    assert "type filter hook input priority filter; policy drop;" in text
    assert "reject with icmpx type admin-prohibited" in lines
    assert all(f"counter {name} {{ }}" in lines for name in nftrules.COUNTERS)
    # deny classes come before the allow list, DNS after it; order is the policy
    order = [
        next(i for i, line in enumerate(lines) if key in line)
        for key in ("denied_metadata", "allow[0]", "th dport 53")
    ]
    assert order == sorted(order)
    assert nftrules.dns_server(allow) == DNS


def test_names_open_only_the_gateway_listener_on_the_guest_link() -> None:
    base: dict[str, Any] = dict(
        table="avm_x",
        guest_dev="l-tap",
        uplink_dev="l-up",
        guest_addr=ipaddress.IPv4Address("10.231.0.2"),
        host_nets=(ipaddress.IPv4Network("10.231.0.0/16"),),
        allow=(),
        log_prefix="avm-l avm_x deny: ",
    )
    rule = (
        'iifname "l-tap" ip daddr 10.231.0.1 tcp dport { 443, 8443 } '
        'ct state new counter name "allowed_gateway" accept'
    )
    with_gw = nftrules.render(
        nftrules.RulesetSpec(
            **base, gateway_addr=ipaddress.IPv4Address("10.231.0.1"), gateway_ports=(443, 8443)
        )
    )
    lines = [line.strip() for line in with_gw.splitlines()]
    assert lines.index(rule) < lines.index('iifname "l-tap" counter name "denied_host" goto deny')
    assert 'counter name "allowed" accept' not in with_gw  # no forwarding rule for a name
    assert 'name "allowed_gateway" accept' not in nftrules.render(nftrules.RulesetSpec(**base))


@pytest.mark.parametrize(
    ("job_id", "label", "code"),
    [
        ("Bad Id", "avm", "invalid-job-id"),
        ("job-1", "a--b", "invalid-egress-label"),
        ("job-1", "A", "invalid-egress-label"),
    ],
)
def test_bad_names_are_refused(job_id: str, label: str, code: str) -> None:
    with pytest.raises(UsageError) as err:
        Names.of(job_id, label)
    assert err.value.code == code


def test_names_fit_interfaces_and_labels_do_not_shadow_each_other() -> None:
    long = Names.of("j" * 64, "a-label-longer-than-nine")
    assert all(len(n) <= 15 for n in (long.tap, long.uplink_dev, long.host_dev(0x1FFF)))
    assert not Names.of("b--x", "a-b").netns.startswith(Names.of("x", "a").netns_prefix)


def test_the_ruleset_example_in_docs_egress_md_is_what_render_writes() -> None:
    from controlplane.jobs.egress.names import POOL, Names
    from controlplane.jobs.egress.network import _spec

    doc = (Path(__file__).resolve().parent.parent / "docs" / "egress.md").read_text()
    start = doc.index("## The ruleset (generated, example)")
    shown = doc[doc.index("```\n", start) + 4 : doc.index("```", doc.index("```\n", start) + 4)]
    allow = nftrules.validate_rules(
        [EgressRule(host="198.51.100.10", port=443), EgressRule(host="198.51.100.53", port=53, proto="udp")]
    )
    host_nets = [ipaddress.IPv4Network("192.0.2.2"), ipaddress.IPv4Network("127.0.0.0/8"), POOL]
    spec = _spec(
        Names.of("build-42", "j1a2b3c4d"), ipaddress.IPv4Network("10.231.96.192/29"), host_nets, allow
    )
    assert shown == nftrules.render(spec)
