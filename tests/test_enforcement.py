"""The pure parts of "observed in force": probe verdicts, kernel limit readings, the observed
gate, the nspawn /30 allocator, and the host-side ruleset (checked by nft itself in a netns
this test makes)."""

from __future__ import annotations

import json
import secrets
import subprocess
from typing import Any

import pytest

from controlplane.errors import OperationalError
from controlplane.governance import controls as governance
from controlplane.governance import tiers
from controlplane.promote import enforcement
from controlplane.vm import nspawnnet
from tests.plugins.require import require_root, require_tools

V1_UNLIMITED = "9223372036854771712"


def probe_doc(**profile: Any) -> str:
    base: dict[str, Any] = {
        "unit": {"MemoryMax": "134217728", "TasksMax": "32", "CPUQuotaPerSecUSec": "250ms"},
        "destination": "10.0.2.15:40000",
        "control": "connected",
        "sandboxed": {"uid": 999, "gid": 997, "joined": ["2"], "result": "errno 1: Operation not permitted"},
        "limits": {
            "memory": {"file": "/m/memory.max", "value": "134217728"},
            "tasks": {"file": "/m/pids.max", "value": "32"},
            "cpu": {"file": "/m/cpu.max", "value": "25000 100000"},
        },
    }
    base.update(profile)
    return json.dumps({"address": "10.0.2.15", "profiles": {"web": base}})


@pytest.mark.parametrize(
    ("sandboxed", "control", "verdict"),
    [
        ({"uid": 999, "joined": ["2"], "result": "errno 1: Operation not permitted"}, "connected", "denied"),
        ({"uid": 999, "joined": ["2"], "result": "errno 113: No route to host"}, "connected", "denied"),
        ({"uid": 999, "joined": ["2"], "result": "timeout"}, "connected", "denied"),
        ({"uid": 999, "joined": ["2"], "result": "connected"}, "connected", "allowed"),
        # refused by nobody listening: neither a filter nor a connection
        (
            {"uid": 999, "joined": ["2"], "result": "errno 111: Connection refused"},
            "connected",
            "inconclusive",
        ),
        # the listener was not reachable even from outside the sandbox: nothing was shown
        ({"uid": 999, "joined": ["2"], "result": "errno 113: No route to host"}, "timeout", "inconclusive"),
        ({"error": "PermissionError: cgroup.procs"}, "connected", "inconclusive"),
    ],
)
def test_egress_verdicts(sandboxed: dict[str, Any], control: str, verdict: str) -> None:
    observed = enforcement.parse(probe_doc(sandboxed=sandboxed, control=control))["web"]
    assert observed.egress == verdict
    assert observed.egress_detail


def test_a_unit_that_is_not_running_is_inconclusive_not_denied() -> None:
    doc = json.dumps({"address": "10.0.2.15", "profiles": {"web": {"unit": {}, "error": "unit not running"}}})
    observed = enforcement.parse(doc)["web"]
    assert (observed.egress, observed.limits) == ("inconclusive", "inconclusive")


def test_limits_enforced_only_when_the_kernel_applies_the_configured_values() -> None:
    assert enforcement.parse(probe_doc())["web"].limits == "enforced"
    nspawn = enforcement.parse(
        probe_doc(
            limits={
                "memory": {"file": "/sys/fs/cgroup/memory/memory.limit_in_bytes", "value": V1_UNLIMITED},
                "tasks": {"file": "/sys/fs/cgroup/pids/pids.max", "value": None},
                "cpu": {"file": "/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "value": "-1 100000"},
            }
        )
    )["web"]
    assert nspawn.limits == "not-enforced"
    assert {k: r.status for k, r in nspawn.limit_readings.items()} == {
        "memory": "not-enforced",
        "tasks": "not-enforced",
        "cpu": "not-enforced",
    }
    assert nspawn.limit_readings["memory"].kernel == V1_UNLIMITED
    # a different limit than configured is not enforcement of the configured one
    other = enforcement.parse(
        probe_doc(
            limits={
                "memory": {"file": "m", "value": "268435456"},
                "tasks": {"file": "p", "value": "32"},
                "cpu": {"file": "c", "value": "50000 100000"},
            }
        )
    )["web"]
    assert {k: r.status for k, r in other.limit_readings.items()} == {
        "memory": "not-enforced",
        "tasks": "enforced",
        "cpu": "not-enforced",
    }


def test_unconfigured_limits_are_not_claimed() -> None:
    unit = {"MemoryMax": "infinity", "TasksMax": "infinity", "CPUQuotaPerSecUSec": "infinity"}
    observed = enforcement.parse(probe_doc(unit=unit))["web"]
    assert {k: r.status for k, r in observed.limit_readings.items()} == {
        "memory": "not-configured",
        "tasks": "not-configured",
        "cpu": "not-configured",
    }


def test_unparseable_probe_output_is_a_clear_error() -> None:
    with pytest.raises(OperationalError) as info:
        enforcement.parse("Traceback (most recent call last):")
    assert info.value.code == "probe-unparseable"


def test_status_findings_egress_always_limits_only_against_the_apply() -> None:
    nspawn_like = enforcement.parse(
        probe_doc(
            sandboxed={"uid": 999, "joined": ["2"], "result": "connected"},
            limits={
                "memory": {"file": "m", "value": V1_UNLIMITED},
                "tasks": {"file": "p", "value": None},
                "cpu": {"file": "c", "value": "-1 100000"},
            },
        )
    )
    never = enforcement.findings(nspawn_like, {"web": {"limits": "not-enforced"}})
    assert [f.what for f in never] == ["egress deny not observed (allowed)"]
    lost = enforcement.findings(nspawn_like, {"web": {"limits": "enforced"}})
    assert [f.what for f in lost] == ["egress deny not observed (allowed)", "resource limits"]
    assert enforcement.findings(enforcement.parse(probe_doc()), {"web": {"limits": "enforced"}}) == []


def test_the_observed_gate_fails_closed() -> None:
    l1, l0 = tiers.load().get("L1"), tiers.load().get("L0")
    assert governance.evaluate_observed(l1, "denied", "x") == []
    assert [m.control for m in governance.evaluate_observed(l1, "allowed", "uid 65534 connected")] == [
        "default-deny-egress"
    ]
    assert "could not be checked" in governance.evaluate_observed(l1, None)[0].reason
    assert governance.evaluate_observed(l0, "allowed", "x") == []  # L0 does not require it


def test_pick_block_skips_every_used_address_and_wraps() -> None:
    first = nspawnnet.pick_block([("10.233.0.1", 30)], 0)
    assert str(first) == "10.233.0.4/30"
    assert str(nspawnnet.pick_block([("10.233.255.253", 30)], 16383)) == "10.233.0.0/30"
    assert str(nspawnnet.pick_block([("10.233.0.0", 17)], 0)) == "10.233.128.0/30"
    with pytest.raises(OperationalError) as info:
        nspawnnet.pick_block([("10.0.0.0", 8)], 0)
    assert info.value.code == "vm-net-exhausted"


def test_the_host_side_ruleset_loads_twice_with_nft_and_parses_back() -> None:
    require_root("network namespaces")
    require_tools("ip", "nft")
    ns = f"avmtest-enf-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        wanted = [
            nspawnnet.ProfileEgress("web", 999, (("10.0.0.5", 443, "tcp"), ("fd00::1", 53, "udp"))),
            nspawnnet.ProfileEgress("batch", 998, ()),
        ]
        script = nspawnnet.render(wanted)
        for _ in range(2):  # idempotent: the second load neither fails nor duplicates rules
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-c", "-f", "-"], input=script, text=True, check=True
            )
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "avm_egress"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        doc = json.loads(out)
        assert nspawnnet.parse_rules(doc) == {
            "web": {"deny_rule": True, "uid": 999, "allowed_packets": 0, "denied_packets": 0},
            "batch": {"deny_rule": True, "uid": 998, "allowed_packets": 0, "denied_packets": 0},
        }
        web_rules = [i for i in doc["nftables"] if "rule" in i and i["rule"]["chain"] == "profile-web"]
        assert len(web_rules) == 6  # localhost v4+v6, replies, two allows, the reject
        # promoting one profile redefines its chain and leaves the others alone
        only_web = nspawnnet.render([nspawnnet.ProfileEgress("web", 999, ())])
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=only_web, text=True, check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "avm_egress"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        after = json.loads(out)
        assert sorted(nspawnnet.parse_rules(after)) == ["batch", "web"]
        assert len([i for i in after["nftables"] if "rule" in i and i["rule"]["chain"] == "profile-web"]) == 4
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
