"""Drift findings say where, what, expected and actual; in sync means no findings.

The cases of facts -> findings are data: tests/cases/drift.yaml.
"""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.promote.drift import find_drift
from controlplane.promote.facts import HostFacts, UnitFacts
from controlplane.promote.layout import LAYOUT
from tests.plugins import cases
from tests.test_plan import SHA2, D, desired, hardened_unit, in_sync
from tests.test_plan import TOKENS as plan_tokens

# --- what systemd really loads and runs, and every entry of a release (issue: drift status misses) ---

ZETA = "agent-gateway@zeta.service"
ZETA_UID = 990


BASES = {"host": lambda: _host(), "release": lambda: _release_host(GOOD_META)}
TOKENS = {**plan_tokens, "ZETA": ZETA}


@pytest.mark.parametrize("case", cases.load("drift", keys={"base", "patch", "findings"}))
def test_drift_case(case: dict[str, Any]) -> None:
    base = BASES[case["base"]]().model_dump(mode="json")
    host = HostFacts.model_validate(cases.merge(base, cases.expand(case.get("patch", {}), TOKENS)))
    report = find_drift("demo", desired(), host, receipt="7")
    got = [[f.where, f.what, f.expected, f.actual] for f in report.findings]
    assert got == cases.expand(case["findings"], TOKENS)
    assert report.in_sync == (not got)
    assert report.profiles == ("zeta", "alpha")


def _host(**units: UnitFacts) -> HostFacts:
    host = in_sync()
    zeta = host.profiles["zeta"].model_copy(update={"uid": ZETA_UID})
    return host.model_copy(
        update={"units": {**host.units, **units}, "profiles": {**host.profiles, "zeta": zeta}}
    )


def test_recorded_effective_properties_are_compared_one_by_one() -> None:
    from controlplane.promote import unitcheck

    recorded = unitcheck.recorded(hardened_unit("zeta", MemoryMax="268435456", TasksMax="64"))
    expected = desired().model_copy(
        update={
            "profiles": tuple(
                p.model_copy(update={"unit": recorded}) if p.name == "zeta" else p for p in desired().profiles
            )
        }
    )
    same = find_drift(
        "demo", expected, _host(**{ZETA: hardened_unit("zeta", MemoryMax="268435456", TasksMax="64")}), "7"
    )
    assert same.in_sync, same.findings
    raised = _host(**{ZETA: hardened_unit("zeta", MemoryMax="infinity", TasksMax="64")})
    rows = {
        f.where: (f.what, f.expected, f.actual) for f in find_drift("demo", expected, raised, "7").findings
    }
    assert rows == {
        f"{ZETA} MemoryMax": ("effective unit property differs from the apply", "268435456", "infinity")
    }


def _release_host(meta: dict[str, str], content: dict[str, str | None] | None = None) -> HostFacts:
    return _host().model_copy(
        update={"release_meta": {SHA2: meta}, "releases": {SHA2: content or {"app.py": D["a.py"]}}}
    )


GOOD_META: dict[str, str] = {".": "d 0555 0 0", "app.py": "f 0444 0 0"}


def test_exec_bit_is_compared_with_the_signed_commit() -> None:
    exe = desired().model_copy(update={"release_exec": {SHA2: ("app.py",)}})
    report = find_drift("demo", exe, _release_host(GOOD_META), receipt="7")
    assert [(f.where.rsplit("/", 1)[-1], f.expected, f.actual) for f in report.findings] == [
        ("app.py", "0555", "0444")
    ]


def test_a_host_whose_only_apply_failed_is_compared_with_the_state_before_it() -> None:
    from controlplane.promote.drift import against_previous

    host = _host(**{ZETA: hardened_unit("zeta", state="active")})
    back = against_previous(
        "demo", {"zeta": LAYOUT.release_dir(SHA2), "alpha": None}, host, "4", notes=("n",)
    )
    rows = {(f.where, f.what): (f.expected, f.actual) for f in back.findings}
    # alpha had no release before: its link and its running unit are both left over
    assert rows == {
        ("/opt/agent/profiles/alpha/current", "current link differs from before the failed apply"): (
            None,
            LAYOUT.release_dir(SHA2),
        ),
        ("agent-gateway@alpha.service", "unit state differs from before the failed apply"): (
            "not running",
            "active",
        ),
    }
    assert back.baseline == "rollback-target" and back.notes == ("n",)


def test_the_release_engineer_guide_lists_exactly_what_status_compares() -> None:
    import re
    from pathlib import Path

    from controlplane.hostscripts import gather_facts
    from controlplane.promote import unitcheck

    doc = (Path(__file__).resolve().parents[1] / "docs" / "release-engineer.md").read_text()
    section = doc[doc.index("### What status compares") : doc.index("### A host whose apply failed")]
    table = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|$", section, re.M))
    granted = {k: v.replace("{user}", "agent-<profile>") or "(empty)" for k, v in unitcheck.HARDENING.items()}
    assert table == granted
    listed = section[section.index("one by one") : section.index("the main process")]
    assert set(re.findall(r"`(\w+)`", listed)) >= set(gather_facts.UNIT_PROPERTIES)
