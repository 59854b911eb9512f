"""Drift: the live host compared with what the last apply receipt says was applied. Pure.

``avm status`` gathers facts in one round trip and calls ``find_drift``; it never writes to the
host. Every finding says where, what, and expected vs actual.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from controlplane.facts import HostFacts
from controlplane.plan import DesiredState, diff, release_tampered, unexpected_profiles

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


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    where: str
    what: str
    expected: str | None
    actual: str | None


class DriftReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str
    findings: tuple[Finding, ...]
    profiles: tuple[str, ...]
    receipt: str | None  # the apply receipt the host was compared with
    # per profile, what the sandbox probe observed in force (controlplane.enforcement)
    controls: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @property
    def in_sync(self) -> bool:
        return not self.findings


def find_drift(target: str, expected: DesiredState, facts: HostFacts, receipt: str | None) -> DriftReport:
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
            where = f"/opt/agent/releases/{action.target}"
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
    )
