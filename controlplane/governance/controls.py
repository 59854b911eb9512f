"""The risk-tier gate: what a workload provides, against what its tier requires.

``evaluate(tier, evidence)`` is pure: for every control of the tier it returns a ``Missing``
(control id and why) unless the evidence shows the control passed. A control whose evidence is
``None`` (its check could not run: no approval store, no signature check) counts as failed,
never as passed. ``profile_evidence`` and ``job_evidence`` build the evidence of a Tier-1
profile and of a Tier-2 job; ``gate`` raises ``RefusedError('tier-controls-missing')`` (exit 3)
naming each missing control of each workload.

The job runner calls ``gate_job(spec, image_signature=..., home=..., step=...)`` (or
``evaluate_job`` for the list) before it creates anything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from controlplane.canonical import canonical_bytes, sha256_digest
from controlplane.errors import OperationalError, RefusedError
from controlplane.governance import secretscan, tiers

if TYPE_CHECKING:
    from controlplane.evidence.step import Step
    from controlplane.home import Home
    from controlplane.jobs.spec import JobSpec
    from controlplane.release.manifest import Profile, ReleaseManifest

# Evaluated after planning (they bind to the plan digest), not before.
POST_PLAN = frozenset({"approval"})
# Evaluated again after the restart, from what the sandbox probe observed in force
# (controlplane.promote.enforcement): configured is not enough.
OBSERVED = frozenset({"default-deny-egress"})


@dataclasses.dataclass(frozen=True)
class Drill:
    """The newest successful rollback on a target: how long it took and how long ago."""

    minutes: float
    age_days: float


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Per control, what was observed. ``None`` = the check could not run (counts as failed)."""

    signature: bool | None = None
    digest_pins: bool | None = None
    secret_env: dict[str, str] | None = None  # env key -> why it looks like a secret
    open_egress: tuple[str, ...] | None = None  # destinations that allow everything
    egress_addresses: int | None = None  # IPv4 addresses the allowlist opens (union of its CIDRs)
    tools_declared: bool | None = None
    approvers: int | None = None  # distinct valid approvers of this exact plan digest
    canary: bool | None = None
    soak_s: float | None = None
    drill: Drill | None = None
    tier2: bool | None = None
    dedicated_vm: bool | None = None
    # secrets: entries (env name -> ref) whose ref is also an egress credential: the agent gets it
    bound_secrets: dict[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Missing:
    control: str
    reason: str


def _unchecked(what: str) -> str:
    return f"could not be checked ({what}); an unchecked control counts as failed"


def _signature(tier: tiers.Tier, ev: Evidence) -> str | None:
    if ev.signature:
        return None
    return "not verified" if ev.signature is False else _unchecked("no signature check")


def _digest_pins(tier: tiers.Tier, ev: Evidence) -> str | None:
    if ev.digest_pins:
        return None
    return "not pinned" if ev.digest_pins is False else _unchecked("no pins")


def _no_raw_secrets(tier: tiers.Tier, ev: Evidence) -> str | None:
    if ev.secret_env is None:
        return _unchecked("env not scanned")
    return "; ".join(f"env {k} {why}" for k, why in ev.secret_env.items()) or None


def _default_deny_egress(tier: tiers.Tier, ev: Evidence) -> str | None:
    if ev.open_egress is None:
        return _unchecked("egress not declared")
    if ev.open_egress:
        return f"egress allows everything: {', '.join(ev.open_egress)}"
    bound = tier.egress_max_addresses
    if bound is not None and ev.egress_addresses is not None and ev.egress_addresses > bound:
        return f"the allowlist opens {ev.egress_addresses} addresses, at most {bound} at {tier.id}"
    return None


def _tool_allowlist(tier: tiers.Tier, ev: Evidence) -> str | None:
    return None if ev.tools_declared else "no explicit `tools:` allowlist (each tool with schema_sha256)"


def _approval(tier: tiers.Tier, ev: Evidence) -> str | None:
    if ev.approvers is None:
        return _unchecked("no approval store or no plan digest to approve")
    return None if ev.approvers >= tier.approvers else f"{ev.approvers} of {tier.approvers} approver(s)"


def _canary_soak(tier: tiers.Tier, ev: Evidence) -> str | None:
    if not ev.canary:
        return "no canary profile goes first"
    soak = ev.soak_s or 0.0
    return None if soak >= tier.soak_min_s else f"soak {soak:g}s < {tier.soak_min_s:g}s"


def _rollback_drill(tier: tiers.Tier, ev: Evidence) -> str | None:
    bounds = tier.rollback_drill
    if ev.drill is None or bounds is None:
        return "no successful rollback is recorded for this target"
    if ev.drill.minutes > bounds.max_minutes:
        return f"last rollback took {ev.drill.minutes:.1f} min > {bounds.max_minutes:g} min"
    if ev.drill.age_days > bounds.within_days:
        return f"last rollback was {ev.drill.age_days:.1f} days ago > {bounds.within_days:g} days"
    return None


def _tier2_only(tier: tiers.Tier, ev: Evidence) -> str | None:
    return None if ev.tier2 else "a resident Tier-1 service; this tier runs only as Tier-2 jobs"


def _dedicated_vm(tier: tiers.Tier, ev: Evidence) -> str | None:
    return None if ev.dedicated_vm else _unchecked("a Tier-1 host is shared by profiles")


def _credentials_at_boundary(tier: tiers.Tier, ev: Evidence) -> str | None:
    if ev.bound_secrets is None:
        return _unchecked("secrets not compared with the egress credentials")
    return (
        "; ".join(
            f"secret {k} ({ref}) is injected by the gateway and also handed to the agent"
            for k, ref in sorted(ev.bound_secrets.items())
        )
        or None
    )


# One check per control: why the control fails for the evidence (None if it passes). A test keeps
# the keys equal to ``tiers.Control`` and to the controls tiers.yaml names.
CHECKS: dict[str, Callable[[tiers.Tier, Evidence], str | None]] = {
    "signature": _signature,
    "digest-pins": _digest_pins,
    "no-raw-secrets": _no_raw_secrets,
    "default-deny-egress": _default_deny_egress,
    "tool-allowlist": _tool_allowlist,
    "approval": _approval,
    "canary-soak": _canary_soak,
    "rollback-drill": _rollback_drill,
    "tier2-only": _tier2_only,
    "dedicated-vm": _dedicated_vm,
    "credentials-at-boundary": _credentials_at_boundary,
}


def _checks_of(tier: tiers.Tier) -> list[tuple[str, Callable[[tiers.Tier, Evidence], str | None]]]:
    """The check of every control of ``tier``. A tier above L0 with no control, or a control with
    no check, would let every workload pass unchecked: raises ``OperationalError('tiers-invalid')``."""
    if not tier.controls and tier.id != "L0":
        raise OperationalError(
            "tiers-invalid",
            f"risk tier {tier.id} lists no control, so it would pass every workload unchecked",
            hint="list the tier's controls in tiers/tiers.yaml (only L0 may have none)",
        )
    unknown = [c for c in tier.controls if c not in CHECKS]
    if unknown:
        raise OperationalError(
            "tiers-invalid",
            f"risk tier {tier.id} names controls avm has no check for: {', '.join(unknown)}",
            hint=f"controls: {', '.join(CHECKS)}",
            details={"expected": list(CHECKS), "actual": unknown},
        )
    return [(control, CHECKS[control]) for control in tier.controls]


def evaluate(tier: tiers.Tier, ev: Evidence, *, only: Iterable[str] | None = None) -> list[Missing]:
    """Every control of ``tier`` (or of ``only``) that ``ev`` does not show as passed. Pure."""
    chosen = set(only) if only is not None else None
    return [
        Missing(control, reason)
        for control, check in _checks_of(tier)
        if (chosen is None or control in chosen) and (reason := check(tier, ev)) is not None
    ]


def evaluate_observed(tier: tiers.Tier, egress: str | None, detail: str = "") -> list[Missing]:
    """After the restart: the ``OBSERVED`` controls of ``tier`` the probe did not see in force.
    ``egress`` is the probe's verdict (``denied``, ``allowed``, ``inconclusive``); None means no
    probe ran, which counts as failed. Pure."""
    if "default-deny-egress" not in tier.controls or egress == "denied":
        return []
    reason = (
        _unchecked("no sandbox probe ran")
        if egress is None
        else f"configured but not observed in force ({egress}): {detail}"
    )
    return [Missing("default-deny-egress", reason)]


def _open(hosts: Iterable[str]) -> tuple[str, ...]:
    return tuple(h for h in hosts if ipaddress.ip_network(h, strict=False).prefixlen == 0)


def address_count(hosts: Iterable[str]) -> int:
    """IPv4 addresses a list of IPs/CIDRs opens, overlaps counted once."""
    nets = [n for h in hosts if (n := ipaddress.ip_network(h, strict=False)).version == 4]
    return sum(n.num_addresses for n in ipaddress.collapse_addresses(nets))


def profile_evidence(
    manifest: ReleaseManifest,
    profile: Profile,
    chosen: Sequence[Profile],
    *,
    verified: bool,
    drill: Drill | None,
    approvers: int | None = None,
) -> Evidence:
    """Evidence of one Tier-1 profile promoted together with ``chosen``."""
    return Evidence(
        signature=verified,
        digest_pins=verified,
        secret_env=secretscan.scan_env(dict(profile.env)),
        open_egress=_open(r.host for r in profile.egress),
        egress_addresses=address_count(r.host for r in profile.egress),
        tools_declared="tools" in profile.model_fields_set,
        approvers=approvers,
        canary=any(p.canary for p in chosen),
        soak_s=manifest.soak_s,
        drill=drill,
        tier2=False,
        dedicated_vm=None,
        bound_secrets={k: ref for k, ref in profile.secrets.items() if ref in profile.bound_refs},
    )


def job_digest(spec: JobSpec) -> str:
    """What an approval of a job binds to: the digest of the canonical job spec."""
    return sha256_digest(canonical_bytes(spec.model_dump(mode="json")))


def job_evidence(spec: JobSpec, *, image_signature: bool | None, approvers: int | None) -> Evidence:
    """Evidence of one Tier-2 job. Its only tool surface is the MCP servers of ``egress.names``
    (``mcp:``), enforced at the host's job gateway: each must list its ``tools`` explicitly (an
    empty list is an explicit deny-all), each pinned by ``schema_sha256``; a job with none has no
    tool surface at all. It runs in its own microVM (dedicated) and never resides."""
    return Evidence(
        signature=image_signature,
        digest_pins="@sha256:" in spec.image,
        secret_env=secretscan.scan_env(dict(spec.env)),
        open_egress=_open(r.host for r in spec.egress.allow) if spec.egress.default == "deny" else ("*",),
        egress_addresses=address_count(r.host for r in spec.egress.allow),
        tools_declared=all("tools" in r.mcp.model_fields_set for r in spec.egress.names if r.mcp is not None),
        approvers=approvers,
        tier2=True,
        dedicated_vm=True,
        bound_secrets={},  # a job's credentials are only ever the gateway's (jobs.gateway)
    )


def evaluate_job(
    spec: JobSpec, *, image_signature: bool | None = None, home: Home | None = None
) -> list[Missing]:
    """The tier gate for ``avm job run``: the missing controls of ``spec`` (empty: may run).

    ``image_signature``: True if the runner verified the image's signature, None if it did not
    check. With ``home``, approvals of ``job_digest(spec)`` are counted; without it the
    approval control (where the tier has one) cannot be checked and fails.
    """
    tier = tiers.load().get(spec.risk_tier)
    approvers = None
    if home is not None and "approval" in tier.controls:
        from controlplane.governance import approvals

        approvers = len(approvals.find(home, job_digest(spec))[0])
    return evaluate(tier, job_evidence(spec, image_signature=image_signature, approvers=approvers))


def gate_job(
    spec: JobSpec, *, image_signature: bool | None, home: Home | None, step: Step | None = None
) -> None:
    """``evaluate_job`` as a gate: records a ``gate.decision`` event (``gate=risk-tier``) in
    ``step`` and raises ``RefusedError('tier-controls-missing')`` (exit 3) if anything is missing."""
    missing = evaluate_job(spec, image_signature=image_signature, home=home)
    if step is not None:
        step.event(
            "gate.decision",
            gate="risk-tier",
            outcome="fail" if missing else "pass",
            job=spec.id,
            tier=spec.risk_tier,
            tiers_digest=tiers.load().digest,
            missing=[m.control for m in missing],
        )
    if missing:
        raise refuse({f"job {spec.id}": (spec.risk_tier, missing)})


def refuse(failures: dict[str, tuple[str, list[Missing]]]) -> RefusedError:
    """The exit-3 error for ``workload -> (tier, missing controls)``, naming every control."""
    parts = [
        f"{name} ({tier}): " + ", ".join(f"{m.control} [{m.reason}]" for m in missing)
        for name, (tier, missing) in sorted(failures.items())
    ]
    return RefusedError(
        "tier-controls-missing",
        "controls required by the risk tier are missing: " + "; ".join(parts),
        hint="add the named controls (see `avm tiers show TIER`) or declare the tier the workload is",
        details={
            name: {
                "tier": tier,
                "missing": [m.control for m in missing],
                "reasons": {m.control: m.reason for m in missing},
            }
            for name, (tier, missing) in failures.items()
        },
    )


def last_drill(summaries: Iterable[tuple[str, float]], now: dt.datetime | None = None) -> Drill | None:
    """The newest drill from (finished ISO time, duration s) of successful rollback applies."""
    newest = max(summaries, default=None, key=lambda s: s[0])
    if newest is None:
        return None
    finished = dt.datetime.fromisoformat(newest[0].replace("Z", "+00:00"))
    age = ((now or dt.datetime.now(dt.UTC)) - finished).total_seconds() / 86400
    return Drill(minutes=newest[1] / 60, age_days=max(age, 0.0))
