"""The tier gate inside ``avm promote``: before planning, (approvals) after it, and (controls
observed in force) after the restart.

Every decision becomes a ``gate.decision`` event: one per profile for the tier controls
(``gate=risk-tier``), one for the approvals of the plan digest (``gate=approval``), both in the
plan receipt, and one per probed profile for the observed controls (``gate=observed``, in the
apply receipt). The first two refuse (exit 3) with the host untouched; the observed gate runs
after the apply, and its caller stops the units that failed it (fail closed) before refusing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from controlplane.evidence import reader as auditlog
from controlplane.evidence.step import Step
from controlplane.governance import approvals, tiers
from controlplane.governance import controls as governance
from controlplane.home import Home
from controlplane.release.manifest import Profile, ReleaseManifest


def rollback_drills(home: Home, target: str) -> list[tuple[str, float]]:
    """(finished, duration s) of every successful rollback apply recorded for ``target``."""
    out: list[tuple[str, float]] = []
    for _, statement in auditlog.statements(home.receipts):
        pred = statement.predicate
        if (
            pred.kind == "apply"
            and pred.status == "ok"
            and pred.inputs.get("operation") == "rollback"
            and pred.inputs.get("target") == target
            and not pred.result.get("rolled_back")
        ):
            out.append((pred.finished, pred.duration_s))
    return out


def chosen_profiles(manifest: ReleaseManifest, names: Sequence[str]) -> list[Profile]:
    return [manifest.profile(n) for n in names] if names else list(manifest.profiles)


def check_tiers(
    home: Home, manifest: ReleaseManifest, names: Sequence[str], target: str, step: Step
) -> dict[str, str]:
    """Refuse (exit 3) unless every chosen profile has its tier's pre-plan controls.
    Returns profile -> tier. Called after signature and digest verification passed."""
    table = tiers.load()
    chosen = chosen_profiles(manifest, names)
    needs_drill = any("rollback-drill" in table.get(p.risk_tier).controls for p in chosen)
    drill = governance.last_drill(rollback_drills(home, target)) if needs_drill else None
    failures: dict[str, tuple[str, list[governance.Missing]]] = {}
    for prof in chosen:
        tier = table.get(prof.risk_tier)
        ev = governance.profile_evidence(manifest, prof, chosen, verified=True, drill=drill)
        pre = [c for c in tier.controls if c not in governance.POST_PLAN]
        missing = governance.evaluate(tier, ev, only=pre)
        step.event(
            "gate.decision",
            gate="risk-tier",
            outcome="fail" if missing else "pass",
            profile=prof.name,
            tier=tier.id,
            tiers_digest=table.digest,
            checked=pre,
            missing=[m.control for m in missing],
        )
        if missing:
            failures[f"profile {prof.name}"] = (tier.id, missing)
    if failures:
        raise governance.refuse(failures)
    return {p.name: p.risk_tier for p in chosen}


def approvers_needed(profile_tiers: dict[str, str]) -> tuple[int, list[str]]:
    """The most approvers any chosen profile's tier needs, and which profiles need any."""
    table = tiers.load()
    need = {
        p: table.get(t).approvers for p, t in profile_tiers.items() if "approval" in table.get(t).controls
    }
    return max(need.values(), default=0), sorted(need)


def check_approvals(
    home: Home, profile_tiers: dict[str, str], plan_digest: str, step: Step, *, apply: bool
) -> list[dict[str, Any]]:
    """For ``--apply``: refuse unless enough distinct approvers signed exactly ``plan_digest``.
    A dry-run records that approval is deferred to apply and what it will need."""
    needed, who = approvers_needed(profile_tiers)
    if needed == 0:
        return []
    if not apply:
        step.event(
            "gate.decision",
            gate="approval",
            outcome="deferred",
            required=needed,
            profiles=who,
            plan=plan_digest,
        )
        return []
    try:
        found = approvals.require(home, plan_digest, needed, why=f"profile(s) {', '.join(who)}")
    except Exception as exc:
        step.event(
            "gate.decision",
            gate="approval",
            outcome="fail",
            required=needed,
            plan=plan_digest,
            detail=getattr(exc, "details", {}),
        )
        raise
    accepted = [
        {"approver": a.approver, "receipt": a.receipt, "expires": a.expires, "plan": a.plan_digest}
        for a in found
    ]
    step.event(
        "gate.decision",
        gate="approval",
        outcome="pass",
        required=needed,
        plan=plan_digest,
        approvers=[a["approver"] for a in accepted],
    )
    return accepted


def check_observed(
    profile_tiers: dict[str, str], observed: dict[str, Any], step: Step
) -> dict[str, tuple[str, list[governance.Missing]]]:
    """After the restart: per probed profile (``enforcement.Observed``), the tier controls in
    ``governance.OBSERVED`` the probe did not see in force. Records one ``gate.decision``
    (``gate=observed``) per profile; returns the failures for ``governance.refuse``."""
    table = tiers.load()
    failures: dict[str, tuple[str, list[governance.Missing]]] = {}
    for name, obs in sorted(observed.items()):
        tier = table.get(profile_tiers[name]) if name in profile_tiers else None
        if tier is None:
            continue
        missing = governance.evaluate_observed(tier, obs.egress, obs.egress_detail)
        step.event(
            "gate.decision",
            gate="observed",
            outcome="fail" if missing else "pass",
            profile=name,
            tier=tier.id,
            egress=obs.egress,
            limits=obs.limits,
            missing=[m.control for m in missing],
        )
        if missing:
            failures[f"profile {name}"] = (tier.id, missing)
    return failures
