"""Pure planning: ``diff(desired, facts) -> Plan``. No I/O.

An empty plan means the host is in sync. ``avm promote`` prints the plan and its digest;
``avm status`` is the same diff against what the last apply receipt recorded, so drift is
exactly a non-empty plan.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from controlplane._internal.loading import Frozen
from controlplane.canonical import canonical_bytes, domain_digest
from controlplane.promote import unitcheck
from controlplane.promote.facts import HostFacts
from controlplane.promote.layout import LAYOUT, UNIT_TEMPLATE_NAME

ActionKind = Literal[
    "create-release",
    "install-unit",
    "create-user",
    "write-env",
    "write-policy",
    "write-dropin",
    "flip",
    "restart",
]


class DesiredProfile(Frozen):
    """What one profile should look like on the host (digests of exactly the bytes avm writes)."""

    name: str
    release: str  # commit sha
    env: str  # sha256:... of the env file
    policy: str  # sha256:... of the runtime policy file
    dropin: str  # sha256:... of the per-profile unit drop-in
    canary: bool = False
    # effective unit properties the apply observed after restarting the unit (None: not recorded)
    unit: dict[str, str] | None = None


class DesiredState(Frozen):
    unit_template: str  # sha256:... of units/agent-gateway@.service
    releases: dict[str, dict[str, str | None]]  # sha -> {path: sha256:...}: the write-once content
    profiles: tuple[DesiredProfile, ...]
    # sha -> the files unpacked executable (0555); a release absent here predates the record
    release_exec: dict[str, tuple[str, ...]] = Field(default_factory=dict)


class Action(Frozen):
    kind: ActionKind
    target: str  # the profile, release sha or path the action touches
    reason: str
    expected: str | None = None
    actual: str | None = None


class Plan(Frozen):
    actions: tuple[Action, ...] = Field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not self.actions

    @property
    def digest(self) -> str:
        return domain_digest("plan", canonical_bytes(self.model_dump(mode="json")))

    def restarts(self) -> list[str]:
        return [a.target for a in self.actions if a.kind == "restart"]


# a restart with this reason runs `systemctl daemon-reload` first
RELOAD_REASON = "unit files changed on disk since systemd loaded them"


def _file_action(kind: ActionKind, profile: str, want: str, have: str | None, what: str) -> Action | None:
    if want == have:
        return None
    reason = f"{what} missing" if have is None else f"{what} differs"
    return Action(kind=kind, target=profile, reason=reason, expected=want, actual=have)


def diff(desired: DesiredState, facts: HostFacts) -> Plan:
    """The actions that turn ``facts`` into ``desired``, in the order apply runs them.

    Releases are write-once: a release directory that exists with different content is not
    "fixed" here; ``release_tampered`` reports it and the caller refuses.
    """
    actions: list[Action] = []
    for sha in sorted(desired.releases):
        if sha not in facts.releases:
            actions.append(Action(kind="create-release", target=sha, reason="release not on host"))
    if facts.unit_template != desired.unit_template:
        actions.append(
            Action(
                kind="install-unit",
                target=UNIT_TEMPLATE_NAME,
                reason="unit template missing" if facts.unit_template is None else "unit template differs",
                expected=desired.unit_template,
                actual=facts.unit_template,
            )
        )
    # Canaries first: apply restarts them, checks health and soaks before the rest.
    ordered = sorted(desired.profiles, key=lambda p: (not p.canary, p.name))
    for want in ordered:
        have = facts.profiles.get(want.name)
        changed: list[Action] = []
        if have is None or not have.user:
            actions.append(
                Action(kind="create-user", target=want.name, reason=f"user {LAYOUT.user(want.name)} missing")
            )
        for kind, digest, current, what in (
            ("write-env", want.env, have.env if have else None, "env file"),
            ("write-policy", want.policy, have.policy if have else None, "tool policy"),
            ("write-dropin", want.dropin, have.dropin if have else None, "unit drop-in"),
        ):
            act = _file_action(kind, want.name, digest, current, what)  # type: ignore[arg-type]
            if act:
                changed.append(act)
        link = LAYOUT.release_dir(want.release)
        current_link = have.current if have else None
        if current_link != link:
            changed.append(
                Action(
                    kind="flip",
                    target=want.name,
                    reason="current points elsewhere" if current_link else "no current release",
                    expected=link,
                    actual=current_link,
                )
            )
        unit = facts.unit(want.name)
        active = unit is not None and unit.ActiveState == "active"
        template_changed = facts.unit_template != desired.unit_template
        stale = None
        if unit is not None and unit.need_reload:
            stale = RELOAD_REASON
        elif unit is not None and unitcheck.process_gaps(
            want.name, unit, have.uid if have else None, LAYOUT.release_dir(want.release)
        ):
            stale = "the running process is not the hardened unit"
        if changed or template_changed or not active or stale:
            reason = (
                "configuration changed"
                if (changed or template_changed)
                else ("unit not active" if not active else str(stale))
            )
            changed.append(
                Action(
                    kind="restart",
                    target=want.name,
                    reason=reason,
                    expected="active",
                    actual=unit.ActiveState if unit else "absent",
                )
            )
        actions.extend(changed)
    return Plan(actions=tuple(actions))


def release_tampered(desired: DesiredState, facts: HostFacts) -> list[Action]:
    """Entries of a release on the host that differ from what was signed: content, type,
    mode, owner, or an entry the signed list does not have (``releasecheck``)."""
    from controlplane.promote import releasecheck

    found: list[Action] = []
    agent_uids = {p.uid: LAYOUT.user(name) for name, p in facts.profiles.items() if p.uid is not None}
    for sha, want_files in sorted(desired.releases.items()):
        have_files = facts.releases.get(sha)
        if have_files is None:
            continue
        exe = desired.release_exec.get(sha)
        for where, what, want, have in releasecheck.entries(
            LAYOUT.release_dir(sha), want_files, exe, facts.release_meta.get(sha, {}), agent_uids
        ):
            found.append(Action(kind="create-release", target=where, reason=what, expected=want, actual=have))
        for path in sorted(set(want_files) | set(have_files)):
            want, have = want_files.get(path), have_files.get(path)
            if want != have:
                found.append(
                    Action(
                        kind="create-release",
                        target=f"{LAYOUT.release_dir(sha)}/{path}",
                        reason="release file differs from the signed bundle"
                        if want and have
                        else ("release file missing" if want else "unexpected entry in release (not signed)"),
                        expected=want,
                        actual=have,
                    )
                )
    return found


def unexpected_profiles(desired: DesiredState, facts: HostFacts) -> list[str]:
    wanted = {p.name for p in desired.profiles}
    return sorted(name for name, f in facts.profiles.items() if name not in wanted and f.current)


__all__ = [
    "Action",
    "DesiredProfile",
    "DesiredState",
    "Plan",
    "diff",
    "release_tampered",
    "unexpected_profiles",
]
