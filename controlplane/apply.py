"""Execute a plan on a host, canaries first, with health checks and automatic rollback.

Only ``promote --apply`` calls this, after it re-gathered facts and found the same plan digest,
and after the rollback target was recorded. Every command and check goes into the step's receipt.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

from controlplane import hostops
from controlplane.errors import OperationalError
from controlplane.evidence import Step
from controlplane.facts import HostFacts
from controlplane.material import Material, ProfileMaterial
from controlplane.plan import Plan
from controlplane.transport.base import Transport

Progress = Callable[[str], None]
FILE_KINDS = ("write-env", "write-policy", "write-dropin")


@dataclasses.dataclass(frozen=True)
class Previous:
    """What a profile had before this apply: enough to put it back exactly."""

    current: str | None
    files: dict[str, bytes | None]  # action kind -> previous bytes (None: absent)


@dataclasses.dataclass
class Outcome:
    healthy: list[str] = dataclasses.field(default_factory=list)
    rolled_back: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rolled_back and not self.skipped


def capture_previous(host: Transport, material: Material, facts: HostFacts) -> dict[str, Previous]:
    """Read back what each profile has now (before any change), for automatic rollback."""
    out: dict[str, Previous] = {}
    for prof in material.profiles:
        have = facts.profiles.get(prof.name)
        files: dict[str, bytes | None] = {}
        for kind in FILE_KINDS:
            digest = getattr(have, kind.removeprefix("write-"), None) if have else None
            files[kind] = host.get(hostops.profile_file(kind, prof.name)[0]) if digest else None
        out[prof.name] = Previous(current=have.current if have else None, files=files)
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
    creds = credentials or {}
    for action in plan.actions:
        if action.kind == "create-release":
            progress(f"create release {action.target[:12]} (write-once, verified per file)")
            step.command(hostops.create_release(host, material.releases[action.target]))
        elif action.kind == "install-unit":
            progress("install units/agent-gateway@.service")
            hostops.install_unit(host, material.unit)
            step.event("host.write", path="agent-gateway@.service", digest=action.expected)
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
    return outcome


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
    reload_needed = any(a.kind in ("install-unit", "write-dropin") for a in plan.actions)
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
            step.command(hostops.flip(host, prof.name, hostops.release_dir(prof.release)))
        if "restart" in kinds:
            progress(f"{label} {prof.name}: restart and health-check")
            step.command(hostops.restart(host, prof.name))
        ok, body, result = hostops.health(host, prof.health, prof.release)
        step.command(result)
        step.check(f"health:{prof.name}", ok=ok, detail=str(body))
        if ok:
            outcome.healthy.append(prof.name)
        else:
            _rollback(host, prof, previous[prof.name], step, progress, str(body.get("error", body)))
            outcome.rolled_back.append(prof.name)


def _rollback(
    host: Transport, prof: ProfileMaterial, prev: Previous, step: Step, progress: Progress, why: str
) -> None:
    """Put one profile back exactly as it was, and check that it came back."""
    progress(f"{prof.name}: unhealthy ({why}); rolling back automatically")
    step.event("rollback.auto", profile=prof.name, reason=why, to=prev.current)
    for kind, data in prev.files.items():
        path, mode = hostops.profile_file(kind, prof.name)
        if data is None:
            host.run(["rm", "-f", path], timeout=30)
        else:
            host.put(data, path, mode=mode)
    step.command(hostops.daemon_reload(host))
    if prev.current is None:
        step.command(hostops.stop(host, prof.name))
        host.run(["rm", "-f", hostops.current_link(prof.name)], timeout=30)
        step.check(f"rollback:{prof.name}", ok=True, detail="no previous release: unit stopped, link removed")
        return
    step.command(hostops.flip(host, prof.name, prev.current))
    step.command(hostops.restart(host, prof.name))
    commit = prev.current.rstrip("/").rsplit("/", 1)[-1]
    ok, body, _ = hostops.health(host, prof.health, commit)
    step.check(f"rollback:{prof.name}", ok=ok, detail=str(body))
    if not ok:
        raise OperationalError(
            "rollback-unhealthy",
            f"profile {prof.name} failed its health check and its previous release {commit[:12]} "
            f"did not come back healthy either: {body}",
            hint="inspect `journalctl -u agent-gateway@" + prof.name + "` on the host",
        )
