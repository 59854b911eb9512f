"""Tier-1 promotion: resolve -> verify -> gather -> plan -> (stop unless --apply) -> apply.

Each stage boundary is evidence: a ``plan`` receipt for every run (dry-run included), and for
``--apply`` a ``rollback-target`` receipt written before the host is touched, then an ``apply``
receipt with every command, check, automatic rollback, and the host state it leaves, which
``avm status`` compares the live host with. Rollback is a promotion of the recorded target.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controlplane._internal.progress import Progress, quiet
from controlplane.boundary import tier1
from controlplane.errors import AvmError, OperationalError, RefusedError
from controlplane.evidence import step as evidence
from controlplane.governance import controls as governance
from controlplane.governance import gate as governance_gate
from controlplane.governance import secrets as secret_store
from controlplane.home import Home
from controlplane.ids import CommitSha, parse_profile
from controlplane.promote import (
    enforcement,
    facts,
    gateway,
    gatewaycheck,
    hostlock,
    hostops,
    plan,
    render,
    unitcheck,
)
from controlplane.promote import state as promotestate
from controlplane.promote.apply import apply_plan, capture_previous
from controlplane.promote.layout import LAYOUT
from controlplane.promote.material import Material, ReleaseMaterial
from controlplane.release.manifest import ReleaseManifest
from controlplane.transport import inventory
from controlplane.transport.base import Transport


@dataclasses.dataclass(frozen=True)
class Verified:
    """A release that passed every gate: exact commit, trusted signature, pinned digests."""

    sha: CommitSha
    manifest: ReleaseManifest
    release: ReleaseMaterial
    keyid: str


@dataclasses.dataclass
class Result:
    operation: str
    target: str
    commit: CommitSha
    plan: plan.Plan
    applied: bool = False
    receipts: dict[str, str] = dataclasses.field(default_factory=dict)
    healthy: list[str] = dataclasses.field(default_factory=list)
    rolled_back: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    tiers: dict[str, str] = dataclasses.field(default_factory=dict)
    approvals_required: int = 0
    approvals: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "target": self.target,
            "commit": self.commit,
            "plan_digest": self.plan.digest,
            "in_sync": self.plan.empty,
            "actions": [a.model_dump() for a in self.plan.actions],
            "applied": self.applied,
            "receipts": self.receipts,
            "healthy": self.healthy,
            "rolled_back": self.rolled_back,
            "skipped": self.skipped,
            "tiers": self.tiers,
            "approvals_required": self.approvals_required,
            "approvals": self.approvals,
        }


def verify_release(home: Home, repo: Path, ref: str, step: evidence.Step, progress: Progress) -> Verified:
    """Resolve and verify. Raises ``RefusedError`` (exit 3) on any failed gate; touches no host."""
    from controlplane.release import bundle, git, sigstoretrust
    from controlplane.release import trust as signing

    sha = git.resolve(repo, ref)
    step.subject(f"commit:{sha}", f"sha1:{sha}")
    step.event("gate.decision", gate="resolve", outcome="pass", ref=ref, commit=sha)
    progress(f"resolved {ref} -> {sha}")
    built = bundle.build(repo, sha)
    step.subject("bundle", built.digest)
    keyid = sigstoretrust.verify_signature_gate(home, built, step)
    manifest = signing.load_manifest(repo, sha)
    signing.verify_artifacts(manifest, built)
    step.event("gate.decision", gate="pinned-digests", outcome="pass", artifacts=len(manifest.artifacts))
    progress(f"verified signature ({keyid[:19]}) and {len(manifest.artifacts)} pinned artifact digest(s)")
    release = ReleaseMaterial(
        sha=sha,
        bundle=built.data,
        files={**built.files, **{path: f"symlink:{to}" for path, to in built.symlinks.items()}},
        bundle_digest=built.digest,
        executables=tuple(sorted(built.executables)),
    )
    return Verified(sha=sha, manifest=manifest, release=release, keyid=keyid)


gather = facts.gather  # all Tier-1 facts of a host in one round trip


def _connect(home: Home, target: str) -> Transport:
    from controlplane.transport import connect

    return connect(inventory.load(home, target))


def _refuse_unsafe_host(target: str, sha: str, desired: plan.DesiredState, seen: facts.HostFacts) -> None:
    """Refuse to plan onto a tampered release or a unit avm does not fully own (exit 3)."""
    tampered = plan.release_tampered(desired, seen)
    if tampered:
        raise RefusedError(
            "release-tampered",
            f"release {sha[:12]} on {target} differs from the signed bundle "
            f"({len(tampered)} entr(y/ies), e.g. {tampered[0].target}: {tampered[0].reason})",
            hint="releases are write-once: investigate the host; avm will not overwrite it",
            details={"files": [a.target for a in tampered[:20]]},
        )
    foreign = {
        path: p.name
        for p in desired.profiles
        if (unit := seen.unit(p.name)) is not None
        for path in unitcheck.foreign_files(p.name, unit)
    }
    if foreign:
        raise RefusedError(
            "unit-foreign-files",
            f"systemd on {target} loads unit files avm did not write: " + ", ".join(sorted(foreign)),
            hint="an override can change the user, sandbox or code of the agent; remove it, run "
            "`systemctl daemon-reload`, and promote again",
            details={"files": foreign},
        )


def _secret_values(home: Home, material: Material) -> dict[str, dict[str, bytes]]:
    """Resolve every secret reference before the host is touched (fail closed)."""
    values = {
        p.name: {name: secret_store.resolve(home, ref) for name, ref in p.secret_refs}
        for p in material.profiles
        if p.secret_refs
    }
    if material.gateway is not None:  # the gateway's, by ref (never an agent's credential)
        values[GATEWAY_KEY] = {ref: secret_store.resolve(home, ref) for ref in material.gateway.refs}
    return values


GATEWAY_KEY = "\0gateway"  # not a profile name: the gateway's credential values in _secret_values


def run(
    home: Home,
    *,
    repo: Path,
    ref: str,
    target: str,
    profiles: Sequence[str] = (),
    apply: bool = False,
    operation: str = "promote",
    progress: Progress = quiet,
) -> Result:
    """Promote (or roll back to) ``ref`` on ``target``. Dry-run unless ``apply``.

    Raises ``RefusedError`` for any failed gate (signature, digests, tampered release, plan
    changed, host locked) with the host unchanged, ``UsageError`` for bad input, and
    ``OperationalError('apply-unhealthy')`` (exit 1) after an automatic rollback.
    """
    inputs = {
        "operation": operation,
        "repo": str(repo),
        "ref": ref,
        "target": target,
        "profiles": list(profiles),
    }
    # the host connection is closed on every path: a refusal, an error, a dry run, an apply
    with contextlib.ExitStack() as connection:
        with evidence.record_step(home, "plan", inputs={**inputs, "apply": apply}) as step:
            profiles = [parse_profile(p) for p in profiles]  # refused inside the step: recorded
            verified = verify_release(home, repo, ref, step, progress)
            profile_tiers = governance_gate.check_tiers(home, verified.manifest, profiles, target, step)
            progress(
                "risk tiers: "
                + ", ".join(f"{p} {t}" for p, t in sorted(profile_tiers.items()))
                + " (controls ok)"
            )
            gw = gateway.prepare(home, target, verified.manifest.profiles)
            material = render.material(verified.manifest, verified.release, profiles=profiles, gateway=gw)
            if gw is not None:
                step.observe("gateway", gw.describe())
            host = connection.enter_context(_connect(home, target))
            desired = material.desired()
            names = [p.name for p in material.profiles]
            host_facts = gather(host, names, list(desired.releases))
            _refuse_unsafe_host(target, verified.sha, desired, host_facts)
            the_plan = plan.diff(desired, host_facts)
            step.subject("plan", the_plan.digest)
            step.result.update(
                {"plan_digest": the_plan.digest, "actions": [a.model_dump() for a in the_plan.actions]}
            )
            step.observe("host_facts", host_facts.model_dump(mode="json"))
            needed = governance_gate.approvers_needed(profile_tiers)[0]
            approved = (
                governance_gate.check_approvals(home, profile_tiers, the_plan.digest, step, apply=apply)
                if not the_plan.empty
                else []
            )
            if needed and not apply and not the_plan.empty:
                progress(
                    f"approval required before --apply: {needed} approver(s) must sign {the_plan.digest}"
                )
            if not apply:
                step.non_claim("dry-run: nothing was written to the host")
        result = Result(operation, target, verified.sha, the_plan, receipts={"plan": step.receipt_id or ""})
        result.tiers, result.approvals_required, result.approvals = profile_tiers, needed, approved
        if not apply or the_plan.empty:
            return result
        try:
            credentials = _secret_values(home, material)
            _apply(home, host, result, verified, material, credentials, inputs, progress)
        except AvmError as exc:
            # a refusal between the plan and the apply steps (a secret that does not resolve, a
            # changed plan, a locked host) is evidence too: an `apply` receipt that says why. An
            # error after the apply step (apply-unhealthy) is already in that step's receipt.
            if "apply" not in result.receipts:
                evidence.record_unrecorded(home, "apply", exc, inputs=inputs)
            elif exc.receipt is None:
                exc.receipt = result.receipts["apply"]
            raise
    return result


def _apply(
    home: Home,
    host: Transport,
    result: Result,
    verified: Verified,
    material: Material,
    credentials: dict[str, dict[str, bytes]],
    inputs: dict[str, Any],
    progress: Progress,
) -> None:
    names = [p.name for p in material.profiles]
    desired = material.desired()
    with hostlock.hold(host, f"avm {result.operation} {verified.sha[:12]}") as lock:
        regathered = gather(host, names, list(desired.releases))
        again = plan.diff(desired, regathered)
        if again.digest != result.plan.digest:
            raise RefusedError(
                "plan-changed",
                f"the host changed since the plan was made on {result.target}",
                hint="run the dry-run again and review the new plan",
                details={"expected": result.plan.digest, "actual": again.digest},
            )
        with evidence.record_step(home, "rollback-target", inputs=inputs) as target_step:
            target_step.subject("plan", result.plan.digest)
            targets = {
                name: (regathered.profiles[name].current if name in regathered.profiles else None)
                for name in names
            }
            target_step.result["previous"] = targets
            target_step.observe("lock", lock)
        result.receipts["rollback-target"] = target_step.receipt_id or ""
        previous = capture_previous(host, material, regathered)
        prior = promotestate.recorded_state(home, result.target)
        with evidence.record_step(home, "apply", inputs=inputs) as step:
            step.subject(f"commit:{verified.sha}", f"sha1:{verified.sha}")
            step.subject("plan", result.plan.digest)
            step.observe("lock", lock)
            step.non_claim("secret values were written to the host as credentials and are not recorded")
            step.result["approvals"] = result.approvals
            for approval in result.approvals:
                step.event("approval.accepted", **approval)
            if result.operation == "rollback":
                step.event("rollback.run", commit=verified.sha, profiles=names)
            for prof in material.profiles:
                for cred, ref in prof.secret_refs:
                    step.event(
                        "secret.load",
                        profile=prof.name,
                        credential=cred,
                        ref=ref,
                        version=secret_store.version(home, ref),
                    )
            # where egress is enforced outside the VM (nspawn), the rules go in before any restart
            the_target = inventory.load(home, result.target)
            enforcement.install_host_side(the_target, host, material, step)
            gateway_values = credentials.pop(GATEWAY_KEY, {})
            if material.gateway is not None:
                _install_gateway(home, the_target, host, material, gateway_values, step, progress)
            elif host.run(["test", "-e", str(tier1.ETC)], timeout=30).ok:
                gateway.remove(the_target, host, step)  # no name listed any more
                progress("egress gateway removed: no profile lists a name")
            outcome = apply_plan(host, result.plan, material, previous, step, progress, credentials)
            result.applied = True
            refused = _observe_controls(host, result, outcome.healthy, step, progress)
            failed_probes = (
                gatewaycheck.probe(host, material.gateway, outcome.healthy, step) if material.gateway else []
            )
            for name in failed_probes:
                progress(f"boundary probe failed: {name}")
            result.healthy, result.rolled_back, result.skipped = (
                outcome.healthy,
                outcome.rolled_back,
                outcome.skipped,
            )
            state = promotestate.merge_state(
                prior[1] if prior else None, material, outcome.rolled_back, outcome.skipped, outcome.units
            )
            step.result.update(
                {
                    "healthy": outcome.healthy,
                    "rolled_back": outcome.rolled_back,
                    "skipped": outcome.skipped,
                    "host_state": state.model_dump(mode="json"),
                }
            )
        result.receipts["apply"] = step.receipt_id or ""
    if refused:
        raise governance.refuse(refused)
    if failed_probes:
        raise OperationalError(
            "egress-probe-failed",
            f"the egress boundary was not observed in force: {', '.join(failed_probes)}",
            hint=f"`avm receipts show {result.receipts['apply']}` has each probe's outcome",
            details={"failed": failed_probes},
        )
    if not outcome.ok:
        raise OperationalError(
            "apply-unhealthy",
            f"{', '.join(outcome.rolled_back)} failed health checks and were rolled back automatically"
            + (f"; {', '.join(outcome.skipped)} left untouched" if outcome.skipped else ""),
            hint=f"`avm receipts show {result.receipts['apply']}` has the failure and the rollback",
            details={"rolled_back": outcome.rolled_back, "skipped": outcome.skipped},
        )


def _install_gateway(
    home: Home,
    target: inventory.Target,
    host: Transport,
    material: Material,
    values: dict[str, bytes],
    step: evidence.Step,
    progress: Progress,
) -> None:
    """The gateway and the boundary table, before any agent restarts (they bind its files)."""
    assert material.gateway is not None
    for ref in material.gateway.refs:
        step.event("secret.load", profile="avm-gateway", ref=ref, version=secret_store.version(home, ref))
    gw = material.gateway
    # every profile of the manifest gets its chain in the boundary table, restarted now or not
    names = sorted({p.name for p in material.profiles} | set(gw.ip_rules))
    for name in names:
        step.command(hostops.ensure_user(host, name))
    uids = enforcement.host_uids(host, [LAYOUT.user(n) for n in names])
    rules = {**gw.ip_rules, **{p.name: p.egress for p in material.profiles}}
    gateway.install(home, target, host, gw, values, {n: uids[LAYOUT.user(n)] for n in names}, rules, step)
    progress(f"egress gateway {material.gateway.generation[:19]} in force (admin)")


def _observe_controls(
    host: Transport, result: Result, healthy: list[str], step: evidence.Step, progress: Progress
) -> dict[str, tuple[str, list[governance.Missing]]]:
    """Probe every restarted profile's sandbox; a profile whose tier requires a control the
    probe did not see in force is stopped (fail closed) and returned for the refusal (exit 3)."""
    observed = enforcement.probe(host, healthy)
    enforcement.record(step, observed)
    step.result["controls"] = {name: obs.summary() for name, obs in observed.items()}
    for name, obs in sorted(observed.items()):
        progress(f"{name}: egress {obs.egress}, limits {obs.limits} (observed in the sandbox)")
    refused = governance_gate.check_observed(result.tiers, dict(observed), step)
    for label in sorted(refused):
        name = label.removeprefix("profile ")
        step.command(hostops.stop(host, name))
        step.check(f"fail-closed:{name}", ok=True, detail="unit stopped: a required control is not in force")
        healthy.remove(name)
        progress(f"{name}: stopped, its tier requires a control that is not in force")
    step.result["refused_controls"] = sorted(refused)
    return refused
