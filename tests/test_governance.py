"""The risk-tier gate as a pure function: workloads x tiers, with the exact missing controls."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from controlplane.errors import OperationalError, RefusedError, UsageError
from controlplane.evidence.events import EVENT_TYPES
from controlplane.governance import controls as governance
from controlplane.governance import secretscan, tiers
from controlplane.governance.controls import Drill
from controlplane.ids import TIER_IDS
from controlplane.jobs.spec import parse_jobspec
from controlplane.release.manifest import parse_manifest

TOOLS = "tools: [{name: search, schema_sha256: " + "a" * 64 + "}]"
PROFILE = """\
soak_s: {soak}
profiles:
  - name: p
    risk_tier: L0
    canary: {canary}
    entrypoint: [python3, agent.py]
    health: {{port: 18081}}
    {extra}
"""


def _profile(*, soak: int = 0, canary: bool = False, extra: str = "") -> tuple[object, object]:
    manifest = parse_manifest(PROFILE.format(soak=soak, canary=str(canary).lower(), extra=extra).encode())
    return manifest, manifest.profiles[0]


def _tier1(approvers: int | None, drill: Drill | None, **kw: object) -> governance.Evidence:
    manifest, prof = _profile(**kw)  # type: ignore[arg-type]
    return governance.profile_evidence(
        manifest,  # type: ignore[arg-type]
        prof,  # type: ignore[arg-type]
        [prof],  # type: ignore[list-item]
        verified=True,
        drill=drill,
        approvers=approvers,
    )


JOB = {"id": "j1", "image": "busybox@sha256:" + "b" * 64, "command": ["true"]}
WORKLOADS = {
    "bare-service": lambda: _tier1(None, None),
    "allowlisted-canary-60s": lambda: _tier1(1, Drill(2, 1), soak=60, canary=True, extra=TOOLS),
    "open-egress": lambda: _tier1(1, None, extra=TOOLS + "\n    egress: [{host: 0.0.0.0/0, port: 443}]"),
    "l4-ready-service": lambda: _tier1(2, Drill(3, 2), soak=300, canary=True, extra=TOOLS),
    "slow-old-drill": lambda: _tier1(1, Drill(30, 45), soak=60, canary=True, extra="tools: []"),
    "unsigned-job": lambda: governance.job_evidence(parse_jobspec(JOB), image_signature=None, approvers=None),
    "signed-job-2-approvers": lambda: governance.job_evidence(
        parse_jobspec(JOB), image_signature=True, approvers=2
    ),
}
A, T, C, R, T2, D, S, E = (
    "approval",
    "tool-allowlist",
    "canary-soak",
    "rollback-drill",
    "tier2-only",
    "dedicated-vm",
    "signature",
    "default-deny-egress",
)
# workload -> missing controls at L0..L5
EXPECTED: dict[str, tuple[set[str], ...]] = {
    "bare-service": (set(), set(), {T, A}, {T, A, C, R}, {T, A, C, R}, {T, A, T2, D}),
    "allowlisted-canary-60s": (set(), set(), set(), set(), {A, C}, {A, T2, D}),
    "open-egress": (set(), {E}, {E}, {E, C, R}, {E, A, C, R}, {E, A, T2, D}),
    "l4-ready-service": (set(), set(), set(), set(), set(), {T2, D}),
    "slow-old-drill": (set(), set(), set(), {R}, {A, C, R}, {A, T2, D}),
    "unsigned-job": (set(), {S}, {S, A}, {S, A, C, R}, {S, A, C, R}, {S, A}),
    "signed-job-2-approvers": (set(), set(), set(), {C, R}, {C, R}, set()),
}
CASES = [(w, tid, EXPECTED[w][i]) for w in EXPECTED for i, tid in enumerate(TIER_IDS)]


@pytest.mark.parametrize(("workload", "tier_id", "missing"), CASES, ids=[f"{w}-{t}" for w, t, _ in CASES])
def test_workloads_x_tiers_name_exactly_the_missing_controls(
    workload: str, tier_id: str, missing: set[str]
) -> None:
    tier = tiers.load().get(tier_id)
    found = governance.evaluate(tier, WORKLOADS[workload]())
    assert {m.control for m in found} == missing
    assert all(m.reason for m in found)


def test_a_control_that_cannot_be_checked_fails_and_says_so() -> None:
    tier = tiers.load().get("L2")
    found = {m.control: m.reason for m in governance.evaluate(tier, governance.Evidence())}
    assert set(found) == set(tier.controls)  # nothing passes on no evidence
    assert "could not be checked" in found["approval"] and "could not be checked" in found["signature"]


def test_refusal_names_every_missing_control_and_exits_3() -> None:
    tier = tiers.load().get("L3")
    err = governance.refuse({"profile p": ("L3", governance.evaluate(tier, WORKLOADS["bare-service"]()))})
    assert err.exit_code == 3 and err.code == "tier-controls-missing"
    for control in ("tool-allowlist", "approval", "canary-soak", "rollback-drill"):
        assert control in err.message
    assert err.details["profile p"]["missing"] == [
        "tool-allowlist",
        "approval",
        "canary-soak",
        "rollback-drill",
    ]


def test_a_jobs_mcp_server_must_list_its_tools_where_the_tier_asks_for_an_allowlist() -> None:
    def job(mcp: dict[str, object]) -> dict[str, object]:
        name = {"host": "tools.example.test", "port": 443, "methods": ["POST"], "paths": ["/mcp"], "mcp": mcp}
        return {**JOB, "risk_tier": "L2", "egress": {"names": [name]}}

    implicit = governance.evaluate_job(parse_jobspec(job({})), image_signature=True)
    assert [(m.control, m.reason) for m in implicit if m.control == "tool-allowlist"] == [
        ("tool-allowlist", "no explicit `tools:` allowlist (each tool with schema_sha256)")
    ]
    for tools in ([], [{"name": "search", "schema_sha256": "5e" * 32}]):  # deny-all, one pinned tool
        missing = governance.evaluate_job(parse_jobspec(job({"tools": tools})), image_signature=True)
        assert [m.control for m in missing] == ["approval"]


def test_evaluate_job_is_the_job_runner_entry_point() -> None:
    spec = parse_jobspec({**JOB, "risk_tier": "L1", "env": {"TOKEN_X": "ghp_" + "A1b2" * 9}})
    missing = {m.control: m.reason for m in governance.evaluate_job(spec)}
    assert set(missing) == {"signature", "no-raw-secrets"}
    assert "GitHub token" in missing["no-raw-secrets"] and "A1b2" not in missing["no-raw-secrets"]
    assert governance.evaluate_job(parse_jobspec({**JOB, "risk_tier": "L0"})) == []
    with pytest.raises(RefusedError) as exc:
        governance.gate_job(spec, image_signature=True, home=None)
    assert exc.value.details["job j1"]["missing"] == ["no-raw-secrets"]


def _fresh_private_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        .decode()
    )


@pytest.mark.parametrize(
    ("value", "flagged"),
    [
        ("8081", False),
        ("info", False),
        ("/opt/agent/releases/0123456789abcdef0123456789abcdef", False),
        ("http://127.0.0.1:8080/v1/completions", False),
        ("a sentence with several words in it, not a key", False),
        ("claude-3-5-sonnet-20241022", False),
        ("AKIAIOSFODNN7EXAMPLE", True),
        ("ghp_" + "x7Y2" * 9, True),
        ("xoxb-1234567890-abcdefghij", True),
        ("sk-ant-" + "q" * 30, True),
        ("Bearer abcdefghijklmnop", True),
        ("<a private key generated at test time>", True),
        ("https://user:hunter2@db.internal/x", True),
        ("tok-" + "9f" * 16, True),  # 128-bit hex
        ("Zq8vP1mR4tX7wB2nK5yL0sD3", True),  # 24 random chars
    ],
)
def test_secret_looking_values_are_recognised_without_echoing_them(value: str, flagged: bool) -> None:
    if value == "<a private key generated at test time>":
        value = _fresh_private_key_pem()
    reason = secretscan.verdict(value)
    assert (reason is not None) == flagged, reason
    if reason:
        assert value not in reason


def test_manifest_with_a_secret_value_in_env_is_refused_and_the_value_not_echoed() -> None:
    value = "Zq8vP1mR4tX7wB2nK5yL0sD3"
    with pytest.raises(UsageError) as exc:
        _profile(extra=f'env: {{UPSTREAM: "{value}"}}')
    assert "UPSTREAM" in exc.value.message and "entropy" in exc.value.message
    assert value not in str(exc.value) and value not in repr(exc.value.details)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_bad_tier_data_is_refused_never_weakened() -> None:
    good = tiers.TIERS_FILE.read_bytes()
    for bad in (
        good.replace(b"    approvers: 1\n", b"", 1),  # approval without a count
        good.replace(b"tool-allowlist, approval]", b"tool-allowlist, aproval]", 1),  # unknown control
        good.replace(b"id: L5", b"id: L6"),
    ):
        with pytest.raises(OperationalError) as exc:
            tiers.parse_tiers(bad)
        assert exc.value.code == "tiers-invalid"


DOC = Path(__file__).resolve().parents[1] / "docs" / "governance.md"


def test_docs_tier_table_and_event_vocabulary_match_the_code() -> None:
    text = DOC.read_text()
    for tier in tiers.load().tiers:
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| {tier.id} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == tier.name
        assert cells[2] == ", ".join(tier.controls), tier.id
        if tier.egress_max_addresses is not None:
            assert f"allowlist <= {tier.egress_max_addresses} addresses" in cells[3], tier.id
    documented = set(re.findall(r"^\| `([a-z0-9.-]+)` \|", text, re.MULTILINE)) - set(tiers.CONTROLS)
    assert documented == set(EVENT_TYPES)


def test_rollback_drill_evidence_comes_from_successful_rollback_receipts(home: object) -> None:
    from controlplane.evidence import keys
    from controlplane.evidence import step as evidence
    from controlplane.governance.gate import rollback_drills
    from controlplane.home import Home

    assert isinstance(home, Home)
    keys.init(home)
    for operation, target, rolled_back in (
        ("promote", "vm1", []),
        ("rollback", "vm2", []),
        ("rollback", "vm1", ["web"]),  # its own health check failed: not a proven drill
        ("rollback", "vm1", []),
    ):
        with evidence.record_step(home, "apply", inputs={"operation": operation, "target": target}) as step:
            step.result["rolled_back"] = rolled_back
    drills = rollback_drills(home, "vm1")
    assert len(drills) == 1
    drill = governance.last_drill(drills)
    assert drill is not None and drill.minutes < 1 and drill.age_days < 0.01
    assert (
        governance.evaluate(tiers.load().get("L3"), governance.Evidence(drill=drill), only=["rollback-drill"])
        == []
    )


def test_gateway_journal_lines_and_egress_denials_become_vocabulary_events() -> None:
    from controlplane.evidence.events import egress_denied, parse_journal

    journal = "\n".join(
        [
            "hello-agent: GET /healthz",
            'avm-event {"type": "tool.denied", "profile": "web", "tool": "rm", "reason": "unknown-tool"}',
            'avm-event {"type": "tool.denied", "profile": "other", "tool": "x", "reason": "not-allowed"}',
            'avm-event {"type": "made.up", "profile": "web"}',
            "avm-event {not json",
        ]
    )
    assert parse_journal(journal, ["web"]) == [
        {"type": "tool.denied", "profile": "web", "tool": "rm", "reason": "unknown-tool"}
    ]
    denials = [{"daddr": "1.1.1.1", "proto": "tcp", "dport": 443, "class": "denied_other", "packets": 3}]
    events = egress_denied(denials, "j1")
    assert events == [
        {
            "type": "egress.denied",
            "job": "j1",
            "destination": "1.1.1.1:443/tcp",
            "class": "denied_other",
            "packets": 3,
        }
    ]
    assert {e["type"] for e in events} <= set(EVENT_TYPES)
