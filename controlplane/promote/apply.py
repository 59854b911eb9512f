"""Execute a plan on a host, canaries first, with health checks and automatic rollback.

Only ``promote --apply`` calls this, after it re-gathered facts and found the same plan digest,
and after the rollback target was recorded. Every command and check goes into the step's receipt.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

from controlplane._internal.progress import Progress
from controlplane.errors import AvmError, OperationalError
from controlplane.evidence.step import Step
from controlplane.promote import hostops, unitcheck
from controlplane.promote.facts import HostFacts, gather
from controlplane.promote.layout import LAYOUT, UNIT_TEMPLATE_NAME
from controlplane.promote.material import Material, ProfileMaterial
from controlplane.promote.plan import RELOAD_REASON, Plan
from controlplane.transport.base import Transport

FILE_KINDS = ("write-env", "write-policy", "write-dropin")


@dataclasses.dataclass(frozen=True)
class Previous:
    """What a profile had before this apply: enough to put it back exactly.

    Credential bytes are held in memory only, to restore them; they are never recorded.
    """

    current: str | None
    files: dict[str, bytes | None]  # action kind -> previous bytes (None: absent)
    user: bool = True  # the profile's user existed before this apply
    credentials: dict[str, bytes | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Outcome:
    healthy: list[str] = dataclasses.field(default_factory=list)
    rolled_back: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    changed: list[str] = dataclasses.field(default_factory=list)  # profiles this apply wrote to
    flipped: set[str] = dataclasses.field(default_factory=set)  # `current` moved by this apply
    restarted: set[str] = dataclasses.field(default_factory=set)  # unit restarted by this apply
    undone: list[str] = dataclasses.field(default_factory=list)  # put back after a failure
    units: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # observed properties

    @property
    def ok(self) -> bool:
        return not self.rolled_back and not self.skipped


def _read(host: Transport, path: str) -> bytes | None:
    try:
        return host.get(path)
    except OperationalError as exc:
        if exc.code == "remote-file-missing":
            return None
        raise


def capture_previous(host: Transport, material: Material, facts: HostFacts) -> dict[str, Previous]:
    """Read back what each profile has now (before any change), for automatic rollback."""
    out: dict[str, Previous] = {}
    for prof in material.profiles:
        have = facts.profiles.get(prof.name)
        files: dict[str, bytes | None] = {}
        for kind in FILE_KINDS:
            digest = getattr(have, kind.removeprefix("write-"), None) if have else None
            files[kind] = host.get(hostops.profile_file(kind, prof.name)[0]) if digest else None
        creds = {name: _read(host, LAYOUT.credential(prof.name, name)) for name, _ in prof.secret_refs}
        out[prof.name] = Previous(
            current=have.current if have else None,
            files=files,
            user=bool(have and have.user),
            credentials=creds,
        )
    return out


def apply_plan(
    host: Transport,
    plan: Plan,
    material: Material,
    previous: dict[str, Previous],
    step: Step,
    progress: Progress,
    credentials: Mapping[str, Mapping[str, bytes]] | None = None,
) -> Outcome:
    """Run ``plan``. ``credentials`` maps profile -> credential name -> secret value; values
    are written to the host (0600) and never recorded."""
    outcome = Outcome()
    unit_before: list[bytes | None] = []  # the template before this apply, once it was replaced
    try:
        _run(host, plan, material, previous, step, progress, credentials or {}, outcome, unit_before)
    except (Exception, KeyboardInterrupt) as exc:
        _undo(host, material, previous, step, progress, outcome, unit_before, exc)
        raise OperationalError(
            "apply-failed",
            f"the apply failed after changing {', '.join(outcome.changed) or 'no profile'}: "
            + (exc.message if isinstance(exc, AvmError) else repr(exc)),
            hint="every profile it changed was put back (see `undone` in the apply receipt); "
            "fix the cause and promote again",
            details={
                "cause": exc.code if isinstance(exc, AvmError) else type(exc).__name__,
                "changed": outcome.changed,
                "undone": outcome.undone,
            },
        ) from exc
    return outcome


def _run(
    host: Transport,
    plan: Plan,
    material: Material,
    previous: dict[str, Previous],
    step: Step,
    progress: Progress,
    creds: Mapping[str, Mapping[str, bytes]],
    outcome: Outcome,
    unit_before: list[bytes | None],
) -> None:
    for action in plan.actions:
        if action.kind == "create-release":
            progress(f"create release {action.target[:12]} (write-once, verified per file)")
            step.command(hostops.create_release(host, material.releases[action.target]))
        elif action.kind == "install-unit":
            progress(f"install units/{UNIT_TEMPLATE_NAME}")
            unit_before.append(_read(host, LAYOUT.unit_template) if action.actual else None)
            hostops.install_unit(host, material.unit)
            step.event("host.write", path=UNIT_TEMPLATE_NAME, digest=action.expected)
    canaries = [p for p in material.profiles if p.canary and _touched(plan, p.name)]
    rest = [p for p in material.profiles if not p.canary and _touched(plan, p.name)]
    for group, label in ((canaries, "canary"), (rest, "profile")):
        if not group:
            continue
        if outcome.rolled_back:
            outcome.skipped.extend(p.name for p in group)
            step.event("promotion.halted", reason="canary unhealthy", skipped=[p.name for p in group])
            progress(f"canary failed: {', '.join(p.name for p in group)} left untouched")
            break
        _apply_group(host, plan, group, previous, step, progress, outcome, label, creds)
        soak = max((p.soak_s for p in group if p.canary), default=0.0)
        if label == "canary" and not outcome.rolled_back and soak > 0:
            progress(f"soak canaries for {soak:g}s")
            time.sleep(soak)
            for prof in group:
                ok, body, _ = hostops.health(host, prof.health, prof.release)
                step.check(f"canary-soak:{prof.name}", ok=ok, detail=str(body))
                if not ok:
                    _rollback(host, prof, previous[prof.name], step, progress, str(body))
                    outcome.rolled_back.append(prof.name)
                    outcome.healthy.remove(prof.name)
                    outcome.units.pop(prof.name, None)  # observed of a release no longer running


def _touched(plan: Plan, profile: str) -> bool:
    return any(a.target == profile for a in plan.actions)


def _apply_group(
    host: Transport,
    plan: Plan,
    group: list[ProfileMaterial],
    previous: dict[str, Previous],
    step: Step,
    progress: Progress,
    outcome: Outcome,
    label: str,
    creds: Mapping[str, Mapping[str, bytes]],
) -> None:
    outcome.changed.extend(p.name for p in group if p.name not in outcome.changed)
    reload_needed = any(
        a.kind in ("install-unit", "write-dropin") or a.reason == RELOAD_REASON for a in plan.actions
    )
    for prof in group:
        if creds.get(prof.name):
            paths = hostops.write_credentials(host, prof.name, creds[prof.name])
            step.event("host.write-credentials", profile=prof.name, paths=paths, values="not recorded")
        for action in (a for a in plan.actions if a.target == prof.name):
            if action.kind == "create-user":
                step.command(hostops.ensure_user(host, prof.name))
            elif action.kind in FILE_KINDS:
                data = {"write-env": prof.env, "write-policy": prof.policy, "write-dropin": prof.dropin}
                path = hostops.write_profile_file(host, action.kind, prof.name, data[action.kind])
                step.event("host.write", path=path, digest=action.expected)
    if reload_needed:
        step.command(hostops.daemon_reload(host))
    for prof in group:
        kinds = {a.kind for a in plan.actions if a.target == prof.name}
        if "flip" in kinds:
            progress(f"{label} {prof.name}: flip current -> {prof.release[:12]}")
            step.command(hostops.flip(host, prof.name, LAYOUT.release_dir(prof.release)))
            outcome.flipped.add(prof.name)
        if "restart" in kinds:
            progress(f"{label} {prof.name}: restart and health-check")
            outcome.restarted.add(prof.name)
            step.command(hostops.restart(host, prof.name))
        ok, body, result = hostops.health(host, prof.health, prof.release)
        step.command(result)
        step.check(f"health:{prof.name}", ok=ok, detail=str(body))
        if ok:
            outcome.healthy.append(prof.name)
        else:
            _rollback(host, prof, previous[prof.name], step, progress, str(body.get("error", body)))
            outcome.rolled_back.append(prof.name)
    _prove_units(host, [p for p in group if p.name in outcome.healthy], previous, step, progress, outcome)


def _prove_units(
    host: Transport,
    group: list[ProfileMaterial],
    previous: dict[str, Previous],
    step: Step,
    progress: Progress,
    outcome: Outcome,
) -> None:
    """Read back what systemd loaded and runs for each healthy profile (one round trip): only
    avm's unit files, the template's hardening in force, the process as the kernel sees it.
    The properties observed are what ``avm status`` compares with; a gap rolls the profile back."""
    if not group:
        return
    seen = gather(host, [p.name for p in group], [])
    for prof in group:
        unit = seen.unit(prof.name)
        have = seen.profiles.get(prof.name)
        uid = have.uid if have else None
        release = LAYOUT.release_dir(prof.release)
        gaps = (
            ["unit not loaded"]
            if unit is None
            else [
                f"{where}: {what} (expected {e!r}, got {a!r})"
                for where, what, e, a in unitcheck.problems(prof.name, unit, uid, release)
            ]
        )
        step.check(
            f"unit-effective:{prof.name}",
            ok=not gaps,
            detail="; ".join(gaps) or "only avm's files; hardening in force",
        )
        if gaps or unit is None:
            _rollback(host, prof, previous[prof.name], step, progress, "; ".join(gaps))
            outcome.rolled_back.append(prof.name)
            outcome.healthy.remove(prof.name)
        else:
            outcome.units[prof.name] = unitcheck.recorded(unit)


def _rollback(
    host: Transport, prof: ProfileMaterial, prev: Previous, step: Step, progress: Progress, why: str
) -> None:
    """Put one profile back exactly as it was, and check that it came back. Raises
    ``OperationalError('rollback-unhealthy')`` when the previous release does not come back."""
    progress(f"{prof.name}: unhealthy ({why}); rolling back automatically")
    step.event("rollback.auto", profile=prof.name, reason=why, to=prev.current)
    _restore_files(host, prof, prev)
    step.command(hostops.daemon_reload(host))
    ok, body = _restart_previous(host, prof, prev, step)
    if ok and not prev.user:
        step.command(hostops.remove_user(host, prof.name))  # the user this apply created
    if not ok:
        commit = (prev.current or "").rstrip("/").rsplit("/", 1)[-1]
        raise OperationalError(
            "rollback-unhealthy",
            f"profile {prof.name} failed its health check and its previous release {commit[:12]} "
            f"did not come back healthy either: {body}",
            hint=f"inspect `journalctl -u {LAYOUT.unit_name(prof.name)}` on the host",
        )


def _restore_files(host: Transport, prof: ProfileMaterial, prev: Previous) -> None:
    for kind, data in prev.files.items():
        path, mode = hostops.profile_file(kind, prof.name)
        if data is None:
            host.run(["rm", "-f", path], timeout=30)
        else:
            host.put(data, path, mode=mode)
    for name, value in prev.credentials.items():
        path = LAYOUT.credential(prof.name, name)
        if value is None:
            host.run(["rm", "-f", path], timeout=30)
        else:
            host.put(value, path, mode=0o600)


def _restart_previous(host: Transport, prof: ProfileMaterial, prev: Previous, step: Step) -> tuple[bool, str]:
    """Point the profile back at its previous release (or stop it when it had none)."""
    if prev.current is None:
        step.command(hostops.stop(host, prof.name))
        host.run(["rm", "-f", LAYOUT.current_link(prof.name)], timeout=30)
        step.check(f"rollback:{prof.name}", ok=True, detail="no previous release: unit stopped, link removed")
        return True, "stopped"
    step.command(hostops.flip(host, prof.name, prev.current))
    step.command(hostops.restart(host, prof.name))
    commit = prev.current.rstrip("/").rsplit("/", 1)[-1]
    ok, body, _ = hostops.health(host, prof.health, commit)
    step.check(f"rollback:{prof.name}", ok=ok, detail=str(body))
    return ok, str(body)


def _undo(
    host: Transport,
    material: Material,
    previous: dict[str, Previous],
    step: Step,
    progress: Progress,
    outcome: Outcome,
    unit_before: list[bytes | None],
    cause: BaseException,
) -> None:
    """After a failure mid-apply: put back every profile this apply changed, and the unit
    template, exactly; record what was changed and what was undone. Never raises: a step that
    cannot be undone is a failed check in the receipt."""
    why = cause.message if isinstance(cause, AvmError) else repr(cause)
    pending = [n for n in reversed(outcome.changed) if n not in outcome.rolled_back]
    progress(f"apply failed ({why}); undoing {', '.join(pending) or 'nothing'}")
    step.event("apply.failed", reason=why, changed=list(outcome.changed))
    restored: set[str] = set()
    try:
        if unit_before:
            if unit_before[0] is None:
                host.run(["rm", "-f", LAYOUT.unit_template], timeout=30)
            else:
                host.put(unit_before[0], LAYOUT.unit_template, mode=0o644)
    except Exception as exc:  # keep undoing the rest; the receipt says what failed
        step.check("undo:unit-template", ok=False, detail=repr(exc))
    for name in pending:  # one profile that cannot be put back does not stop the others
        try:
            _restore_files(host, material.profile(name), previous[name])
            restored.add(name)
        except Exception as exc:
            step.check(f"undo:files:{name}", ok=False, detail=repr(exc))
    try:
        host.run(["systemctl", "daemon-reload"], timeout=60)
    except Exception as exc:
        step.check("undo:daemon-reload", ok=False, detail=repr(exc))
    for name in pending:
        prof, prev = material.profile(name), previous[name]
        step.event("rollback.auto", profile=name, reason=why, to=prev.current)
        try:
            ok = True
            if name in outcome.restarted:
                ok, _ = _restart_previous(host, prof, prev, step)
            elif name in outcome.flipped and prev.current is not None:
                step.command(hostops.flip(host, name, prev.current))
            elif name in outcome.flipped:
                host.run(["rm", "-f", LAYOUT.current_link(name)], timeout=30).check()
            if not prev.user:
                step.command(hostops.remove_user(host, name))
        except Exception as exc:
            ok = False
            step.check(f"rollback:{name}", ok=False, detail=repr(exc))
        if ok and name in restored:
            outcome.undone.append(name)
    outcome.healthy = [n for n in outcome.healthy if n not in outcome.undone]
    step.result.update({"changed": list(outcome.changed), "undone": list(outcome.undone)})
    step.non_claim(
        "a release directory created by a failed apply stays: releases are write-once and verified"
    )
