"""What the receipts say a target has: the last receipt of a kind, the host state the last good
apply left, the state an apply leaves, and the release a rollback goes back to. Reads only the
receipt store; never a host.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.errors import UsageError
from controlplane.evidence import reader as auditlog
from controlplane.evidence.receipt import Statement
from controlplane.home import Home
from controlplane.promote import plan
from controlplane.promote.material import Material


def last_receipt(home: Home, kind: str, target: str) -> tuple[str, Statement] | None:
    """The newest receipt of ``kind`` for ``target`` with status ok (scanned from HEAD down)."""
    for seq, statement in auditlog.statements(home.receipts, newest_first=True):
        pred = statement.predicate
        if pred.kind == kind and pred.inputs.get("target") == target and pred.status == "ok":
            return str(seq), statement
    return None


def recorded_state(home: Home, target: str) -> tuple[str, plan.DesiredState] | None:
    """What the last successful apply left on ``target`` (receipt id, state)."""
    found = last_receipt(home, "apply", target)
    if found is None:
        return None
    return found[0], plan.DesiredState.model_validate(found[1].predicate.result["host_state"])


def merge_state(
    prior: plan.DesiredState | None,
    material: Material,
    rolled_back: Sequence[str],
    skipped: Sequence[str],
    units: dict[str, dict[str, str]],
) -> plan.DesiredState:
    """The host state after this apply: untouched profiles as before, promoted ones as new,
    each with the effective unit properties the apply observed."""
    new = material.desired()
    keep = {p.name: p for p in (prior.profiles if prior else ())}
    for prof in new.profiles:
        if prof.name not in rolled_back and prof.name not in skipped:
            keep[prof.name] = prof.model_copy(update={"unit": units.get(prof.name)})
    profiles = tuple(sorted(keep.values(), key=lambda p: p.name))
    pool = {**(prior.releases if prior else {}), **new.releases}
    exe = {**(prior.release_exec if prior else {}), **new.release_exec}
    releases = {p.release: pool[p.release] for p in profiles if p.release in pool}
    return plan.DesiredState(
        unit_template=new.unit_template,
        releases=releases,
        profiles=profiles,
        release_exec={sha: exe[sha] for sha in releases if sha in exe},
    )


def rollback_ref(home: Home, target: str, profiles: Sequence[str], to: str | None) -> tuple[str, list[str]]:
    """The release to roll back to: ``--to`` or what was recorded before the last promotion."""
    if to is not None:
        return to, list(profiles)
    found = last_receipt(home, "rollback-target", target)
    if found is None:
        raise UsageError(
            "no-rollback-target",
            f"no rollback target is recorded for {target}",
            hint="pass --to REF; a target is recorded by every `avm promote --apply`",
        )
    previous: dict[str, str | None] = found[1].predicate.result["previous"]
    wanted = list(profiles) or sorted(previous)
    shas = {previous.get(p) for p in wanted}
    if None in shas:
        missing = [p for p in wanted if previous.get(p) is None]
        raise UsageError(
            "no-rollback-target",
            f"profile(s) {', '.join(missing)} had no release before the last promotion",
            hint="pass --to REF, or --profile for the profiles that have one",
        )
    if len(shas) != 1:
        raise UsageError(
            "rollback-targets-differ",
            "the profiles had different releases before the last promotion",
            hint="roll them back one at a time with --profile",
            details={"previous": previous},
        )
    link = shas.pop() or ""
    return link.rstrip("/").rsplit("/", 1)[-1], wanted
