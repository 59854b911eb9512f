"""Tier-1 host facts: one argv, one round trip, one pure ``parse``.

The gatherer (``controlplane/hostscripts/gather_facts.py``, package data) is a stdlib Python
program run with the host's ``python3 -c`` (the golden image ships python3). It only reads:
every release entry (``lstat``: type, mode, owner, content), the layout's ownership, every unit
file and drop-in systemd loaded for each profile, and the effective unit properties.
Facts decide nothing; ``controlplane.promote.plan`` compares them with what is wanted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import Field, ValidationError

from controlplane._internal.loading import Frozen
from controlplane.errors import OperationalError
from controlplane.promote.layout import LAYOUT, unit_name
from controlplane.transport.base import Transport


def _gatherer() -> str:
    """The gatherer's source (package data: controlplane/hostscripts/gather_facts.py)."""
    from controlplane import hostscripts

    return hostscripts.text("gather_facts")


class ProfileFacts(Frozen):
    current: str | None
    env: str | None
    policy: str | None
    dropin: str | None
    user: bool
    uid: int | None = None
    link_meta: str | None = None  # "TYPE MODE UID GID" of the current link (lstat)
    dir_meta: str | None = None  # the same for /opt/agent/profiles/<name>


class UnitFacts(Frozen):
    """One profile's unit as systemd loaded it."""

    Id: str
    LoadState: str = "loaded"  # "not-found" when no unit file exists for it
    ActiveState: str = "unknown"
    SubState: str = "unknown"
    NRestarts: str = "0"
    need_reload: bool = False  # unit files changed on disk since systemd loaded them
    fragment: str = ""
    files: dict[str, str | None] = Field(default_factory=dict)  # every loaded file -> sha256
    on_disk: dict[str, str | None] = Field(default_factory=dict)  # what the next reload would load
    properties: dict[str, str] = Field(default_factory=dict)  # effective, runtime fields removed
    credentials: tuple[str, ...] = ()  # LoadCredential=/SetCredential= lines of the loaded files
    # the main process as the kernel sees it (/proc/PID/status fields and cwd); None: not running
    process: dict[str, str] | None = None


class Then(Frozen):
    """What a second read-only program run by the gatherer printed (one round trip for both)."""

    rc: int
    stdout: str
    stderr: str


class HostFacts(Frozen):
    """What the host looks like now.

    ``releases`` maps sha -> {relative path: sha256:... | symlink:TARGET | special} for every
    non-directory entry; ``release_meta`` maps sha -> {relative path: "TYPE MODE UID GID"} for
    every entry, directories and the release root (".") included.
    """

    unit_template: str | None
    profiles: dict[str, ProfileFacts] = Field(default_factory=dict)
    releases: dict[str, dict[str, str | None]] = Field(default_factory=dict)
    release_meta: dict[str, dict[str, str]] = Field(default_factory=dict)
    layout_meta: dict[str, str | None] = Field(default_factory=dict)
    units: dict[str, UnitFacts] = Field(default_factory=dict)
    systemctl_error: str | None = None
    then: Then | None = None  # the result of ``gather(..., then=ARGV)``

    def unit(self, profile: str) -> UnitFacts | None:
        return self.units.get(unit_name(profile))


def gather_argv(
    profiles: Sequence[str] = (),
    releases: Sequence[str] = (),
    *,
    prefix: str = "",
    then: Sequence[str] | None = None,
) -> list[str]:
    """The one command that gathers every Tier-1 fact of a host.

    ``prefix`` relocates the layout (tests point it at a scratch directory); ``then`` is
    another read-only program of avm's (an argv) that the gatherer runs afterwards, so that
    both cost one round trip (``HostFacts.then``).
    """
    layout = LAYOUT.relocated(prefix)
    request: dict[str, object] = {
        "then": list(then) if then else None,
        "profiles": sorted(profiles),
        "releases_wanted": sorted(releases),
        "releases": layout.releases,
        "profiles_dir": layout.profiles,
        "etc": layout.etc,
        "unit_dir": layout.unit_dir,
    }
    return ["python3", "-c", _gatherer(), json.dumps(request, sort_keys=True)]


def parse(stdout: str) -> HostFacts:
    """Parse the gatherer's output. Raises ``OperationalError('facts-unparseable')``."""
    try:
        return HostFacts.model_validate_json(stdout)
    except ValidationError as exc:
        raise OperationalError(
            "facts-unparseable",
            f"the host's facts could not be parsed: {exc.errors()[0]['msg']}",
            hint="the host may lack python3 or run an incompatible gatherer; nothing was changed",
            details={"stdout_head": stdout[:500]},
        ) from exc


def gather(
    host: Transport, profiles: Sequence[str], releases: Sequence[str], *, then: Sequence[str] | None = None
) -> HostFacts:
    """All Tier-1 facts of the host in one round trip (and ``then``'s output, see gather_argv)."""
    result = host.run(gather_argv(profiles, releases, then=then), timeout=240 if then else 120).check(
        hint="the facts gatherer failed on the host; nothing was changed"
    )
    return parse(result.stdout)
