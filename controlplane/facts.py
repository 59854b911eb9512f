"""Tier-1 host facts: one argv, one round trip, one pure ``parse``.

The gatherer is a short stdlib Python program run with the host's ``python3 -c`` (the golden
image ships python3). It only reads: symlinks, file hashes, unit files and ``systemctl show``.
Facts decide nothing; ``controlplane.plan`` compares them with what is wanted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane.errors import OperationalError

AGENT_ROOT = "/opt/agent"
RELEASES = f"{AGENT_ROOT}/releases"
PROFILES = f"{AGENT_ROOT}/profiles"
ETC = "/etc/agent"
UNIT_DIR = "/etc/systemd/system"
UNIT_TEMPLATE = f"{UNIT_DIR}/agent-gateway@.service"

# Runs on the host. Reads only; prints one JSON document. Kept dependency-free on purpose.
_GATHER = r"""
import hashlib, json, os, pwd, subprocess, sys
req = json.loads(sys.argv[1])
R, P, E, U = req["releases"], req["profiles_dir"], req["etc"], req["unit_dir"]
def digest(path):
    try:
        with open(path, "rb") as fh:
            return "sha256:" + hashlib.sha256(fh.read()).hexdigest()
    except (FileNotFoundError, NotADirectoryError):
        return None
def tree(root):
    out = {}
    for base, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(base, name)
            rel = os.path.relpath(full, root)
            out[rel] = "symlink:" + os.readlink(full) if os.path.islink(full) else digest(full)
    return out
names = set(req["profiles"])
if os.path.isdir(P):
    names |= set(os.listdir(P))
profiles, wanted = {}, set(req["releases_wanted"])
for name in sorted(names):
    link = os.path.join(P, name, "current")
    target = os.readlink(link) if os.path.islink(link) else None
    if target:
        wanted.add(os.path.basename(target.rstrip("/")))
    try:
        pwd.getpwnam("agent-" + name)
        user = True
    except KeyError:
        user = False
    profiles[name] = {
        "current": target,
        "env": digest(os.path.join(E, name + ".env")),
        "policy": digest(os.path.join(E, name + ".policy.json")),
        "dropin": digest(os.path.join(U, "agent-gateway@" + name + ".service.d", "avm.conf")),
        "user": user,
    }
releases = {}
for sha in sorted(wanted):
    path = os.path.join(R, sha)
    if os.path.isdir(path):
        releases[sha] = tree(path)
units, systemctl_error = {}, None
if profiles:
    ids = ["agent-gateway@" + n + ".service" for n in sorted(profiles)]
    try:
        proc = subprocess.run(["systemctl", "show", "--no-pager", "-p", "Id,ActiveState,SubState,NRestarts",
                               *ids], capture_output=True, text=True, timeout=30)
        blocks = proc.stdout.strip().split("\n\n")
    except (OSError, subprocess.TimeoutExpired) as exc:
        blocks, systemctl_error = [], str(exc)
    for block in blocks:
        kv = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if kv.get("Id"):
            units[kv["Id"]] = kv
print(json.dumps({"unit_template": digest(os.path.join(U, "agent-gateway@.service")),
                  "profiles": profiles, "releases": releases, "units": units,
                  "systemctl_error": systemctl_error}))
"""


class ProfileFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    current: str | None
    env: str | None
    policy: str | None
    dropin: str | None
    user: bool


class UnitFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    Id: str
    ActiveState: str = "unknown"
    SubState: str = "unknown"
    NRestarts: str = "0"


class HostFacts(BaseModel):
    """What the host looks like now. ``releases`` maps sha -> {relative path: sha256:... or symlink:...}."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    unit_template: str | None
    profiles: dict[str, ProfileFacts] = Field(default_factory=dict)
    releases: dict[str, dict[str, str | None]] = Field(default_factory=dict)
    units: dict[str, UnitFacts] = Field(default_factory=dict)
    systemctl_error: str | None = None

    def unit(self, profile: str) -> UnitFacts | None:
        return self.units.get(f"agent-gateway@{profile}.service")


def gather_argv(profiles: Sequence[str] = (), releases: Sequence[str] = (), *, prefix: str = "") -> list[str]:
    """The one command that gathers every Tier-1 fact of a host.

    ``prefix`` relocates the layout (tests point it at a scratch directory).
    """
    request = {
        "profiles": sorted(profiles),
        "releases_wanted": sorted(releases),
        "releases": prefix + RELEASES,
        "profiles_dir": prefix + PROFILES,
        "etc": prefix + ETC,
        "unit_dir": prefix + UNIT_DIR,
    }
    return ["python3", "-c", _GATHER, json.dumps(request, sort_keys=True)]


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
