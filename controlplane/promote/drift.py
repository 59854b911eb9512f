"""Drift: the live host compared with what the last apply receipt says was applied. Pure.

``avm status`` gathers facts in one round trip and calls ``find_drift``; it never writes to the
host. Every finding says where, what, and expected vs actual.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from controlplane._internal.loading import Frozen
from controlplane.promote import releasecheck, unitcheck
from controlplane.promote.facts import HostFacts
from controlplane.promote.layout import LAYOUT
from controlplane.promote.plan import DesiredState, diff, release_tampered, unexpected_profiles

_WHAT = {
    "create-release": "release missing",
    "install-unit": "unit template",
    "create-user": "profile user",
    "write-env": "env file",
    "write-policy": "tool policy",
    "write-dropin": "unit drop-in",
    "flip": "current link",
    "restart": "unit state",
}


class Finding(Frozen):
    where: str
    what: str
    expected: str | None
    actual: str | None


class DriftReport(Frozen):
    target: str
    findings: tuple[Finding, ...]
    profiles: tuple[str, ...]
    receipt: str | None  # the receipt the host was compared with
    # "apply": the last good apply; "rollback-target": no good apply exists, so the state
    # recorded before the last (failed) apply touched the host
    baseline: str = "apply"
    notes: tuple[str, ...] = ()
    # per profile, what the sandbox probe observed in force (controlplane.promote.enforcement)
    controls: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @property
    def in_sync(self) -> bool:
        return not self.findings


def _short(value: str | None) -> str | None:
    return value if value is None or len(value) <= 200 else value[:197] + "..."


def unit_findings(expected: DesiredState, facts: HostFacts) -> list[Finding]:
    """What systemd loaded and runs for each profile, against avm's files, the template's
    hardening and the properties the apply recorded (``unitcheck``)."""
    out: list[Finding] = []
    for want in expected.profiles:
        unit = facts.unit(want.name)
        if unit is None:
            continue
        have = facts.profiles.get(want.name)
        found = unitcheck.problems(
            want.name, unit, have.uid if have else None, LAYOUT.release_dir(want.release)
        )
        flagged = {where for where, *_ in found}
        for prop, was, now in unitcheck.property_drift(want.unit or {}, unit):
            where = f"{unit.Id} {prop}"
            if where not in flagged:
                found.append((where, "effective unit property differs from the apply", was, now))
        out += [Finding(where=w, what=what, expected=_short(e), actual=_short(a)) for w, what, e, a in found]
    return out


def layout_findings(expected: DesiredState, facts: HostFacts) -> list[Finding]:
    """The directories above the releases and each profile's ``current`` link: root's alone."""
    agent_uids = {p.uid: LAYOUT.user(n) for n, p in facts.profiles.items() if p.uid is not None}
    problems = [
        p
        for path, info in sorted(facts.layout_meta.items())
        for p in releasecheck.container(path, info, agent_uids)
    ]
    for want in expected.profiles:
        have = facts.profiles.get(want.name)
        if have is None:
            continue
        problems += releasecheck.container(LAYOUT.profile_dir(want.name), have.dir_meta, agent_uids)
        problems += releasecheck.container(
            LAYOUT.current_link(want.name), have.link_meta, agent_uids, kind="l"
        )
    return [Finding(where=w, what=what, expected=e, actual=a) for w, what, e, a in problems]


def find_drift(
    target: str,
    expected: DesiredState,
    facts: HostFacts,
    receipt: str | None,
    *,
    baseline: str = "apply",
    notes: tuple[str, ...] = (),
) -> DriftReport:
    findings: list[Finding] = []
    for action in release_tampered(expected, facts):
        findings.append(
            Finding(where=action.target, what=action.reason, expected=action.expected, actual=action.actual)
        )
    for action in diff(expected, facts).actions:
        if action.kind == "restart":
            if action.actual == "active":
                continue  # a restart the plan would do because of another finding
            action = action.model_copy(update={"reason": "unit not active"})
        where = action.target
        if action.kind == "create-release":
            where = LAYOUT.release_dir(action.target)
        findings.append(
            Finding(
                where=where,
                what=_WHAT[action.kind] + ("" if action.kind == "create-release" else f": {action.reason}"),
                expected=action.expected,
                actual=action.actual,
            )
        )
    for name in unexpected_profiles(expected, facts):
        findings.append(
            Finding(
                where=name,
                what="unexpected profile (not in the last apply)",
                expected=None,
                actual=facts.profiles[name].current,
            )
        )
    findings += unit_findings(expected, facts)
    findings += layout_findings(expected, facts)
    if facts.systemctl_error:
        findings.append(
            Finding(
                where="systemctl",
                what="unit state unreadable",
                expected="systemctl show",
                actual=facts.systemctl_error,
            )
        )
    return DriftReport(
        target=target,
        findings=tuple(findings),
        profiles=tuple(p.name for p in expected.profiles),
        receipt=receipt,
        baseline=baseline,
        notes=notes,
    )


def against_previous(
    target: str,
    previous: Mapping[str, str | None],
    facts: HostFacts,
    receipt: str,
    *,
    notes: tuple[str, ...] = (),
) -> DriftReport:
    """A host on which no apply ever succeeded, against the links recorded before the last one
    touched it (``rollback-target``): each profile must be back where it was, its unit running
    only if it had a release, and what runs must be avm's hardened unit."""
    findings: list[Finding] = []
    for name, link in sorted(previous.items()):
        have = facts.profiles.get(name)
        current = have.current if have else None
        if current != link:
            findings.append(
                Finding(
                    where=LAYOUT.current_link(name),
                    what="current link differs from before the failed apply",
                    expected=link,
                    actual=current,
                )
            )
        unit = facts.unit(name)
        active = unit is not None and unit.ActiveState == "active"
        if active != (link is not None):
            findings.append(
                Finding(
                    where=LAYOUT.unit_name(name),
                    what="unit state differs from before the failed apply",
                    expected="active" if link else "not running",
                    actual=unit.ActiveState if unit else "absent",
                )
            )
        if unit is None:
            continue
        # a unit that should not run is still judged on its files, but has no process to judge
        uid = have.uid if have else None
        for w, what, e, a in unitcheck.problems(name, unit, uid, link if active and link else None):
            findings.append(Finding(where=w, what=what, expected=_short(e), actual=_short(a)))
    return DriftReport(
        target=target,
        findings=tuple(findings),
        profiles=tuple(sorted(previous)),
        receipt=receipt,
        baseline="rollback-target",
        notes=notes,
    )
