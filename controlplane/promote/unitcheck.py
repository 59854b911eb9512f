"""What systemd really runs for a profile, judged three ways. Pure: facts in, findings out.

1. **Unit files.** avm writes exactly two files a profile's unit loads: the template
   ``/etc/systemd/system/agent-gateway@.service`` and the drop-in
   ``agent-gateway@<p>.service.d/avm.conf``. Any other unit file or drop-in systemd loaded (in
   ``/etc``, ``/run`` or ``/usr/lib``, a full ``agent-gateway@<p>.service`` override, a
   ``service.d`` drop-in for every service), loaded now or waiting on disk for the next
   ``daemon-reload`` in any unit search path, is a finding, and so is a unit whose files changed
   on disk since systemd loaded them (``NeedDaemonReload``).
2. **Hardening.** The properties the unit template grants (an unprivileged user, no
   capabilities, a read-only system, ...) must be in force, whatever any file says.
3. **Recorded properties.** Every security-relevant effective property, compared one by one
   with what the apply observed right after it restarted the unit.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.canonical import sha256_hex
from controlplane.promote.facts import UnitFacts
from controlplane.promote.layout import LAYOUT

# Values longer than this are recorded and compared as a digest (SystemCallFilter is ~3 KB).
LONG_VALUE = 256

# What agent-gateway@.service grants, as ``systemctl show`` prints it once loaded. "{user}" is
# the profile's user. A property missing from this table is still compared with the apply's record.
HARDENING: Mapping[str, str] = {
    "User": "{user}",
    "Group": "{user}",
    "DynamicUser": "no",
    "SupplementaryGroups": "",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "IPAddressDeny": "0.0.0.0/0 ::/0",
    "RootDirectory": "",
    "RootImage": "",
    "ReadWritePaths": "",
    "BindPaths": "",
    "ExecStartPre": "",
    "ExecStartPost": "",
    "ExecCondition": "",
    "ExecReload": "",
    "ExecStop": "",
    "ExecStopPost": "",
    "Delegate": "no",
}


def avm_files(profile: str) -> tuple[str, str]:
    """The two unit files avm writes that a profile's unit loads."""
    return LAYOUT.unit_template, LAYOUT.dropin(profile)


def foreign_files(profile: str, unit: UnitFacts) -> dict[str, str | None]:
    """Unit files and drop-ins avm did not write (path -> sha256): loaded now, or on disk where
    the next ``daemon-reload`` would load them."""
    ours = set(avm_files(profile))
    every = {**unit.on_disk, **unit.files}
    return {path: digest for path, digest in sorted(every.items()) if path not in ours}


def compact(value: str) -> str:
    """A property value as recorded: long values become ``sha256:<hex> (N items)``."""
    if len(value) <= LONG_VALUE:
        return value
    return f"sha256:{sha256_hex(value.encode())} ({len(value.split())} items)"


def recorded(unit: UnitFacts) -> dict[str, str]:
    """The properties an apply records for a unit it just restarted (credentials included)."""
    props = {name: compact(value) for name, value in sorted(unit.properties.items())}
    props["credentials"] = compact("\n".join(sorted(unit.credentials)))
    return props


def property_drift(baseline: Mapping[str, str], unit: UnitFacts) -> list[tuple[str, str, str | None]]:
    """(property, recorded, actual) for every recorded property whose effective value changed."""
    now = recorded(unit)
    return [(name, want, now.get(name)) for name, want in sorted(baseline.items()) if now.get(name) != want]


def hardening_gaps(profile: str, unit: UnitFacts) -> list[tuple[str, str, str | None]]:
    """(property, granted, actual) for each hardening property of the template not in force."""
    user = LAYOUT.user(profile)
    out = []
    for name, want in HARDENING.items():
        expected = want.format(user=user)
        actual = unit.properties.get(name)
        if actual != expected:
            out.append((name, expected, actual))
    return out


def process_gaps(
    profile: str, unit: UnitFacts, uid: int | None, release: str
) -> list[tuple[str, str, str | None]]:
    """(what, expected, actual) where the running main process is not the hardened unit: another
    user, privileges it could regain, capabilities, no seccomp filter, or other code (its
    working directory is not the release ``current`` points at)."""
    proc = unit.process
    if proc is None:
        return []
    want = {
        "Uid": str(uid) if uid is not None else LAYOUT.user(profile),
        "NoNewPrivs": "1",
        "CapEff": "0000000000000000",
        "Seccomp": "2",
        "cwd": release,
    }
    return [(key, value, proc.get(key)) for key, value in want.items() if proc.get(key) != value]


# (where, what, expected, actual)
Problem = tuple[str, str, str | None, str | None]


def problems(profile: str, unit: UnitFacts, uid: int | None, release: str | None) -> list[Problem]:
    """Everything about a loaded unit that makes it not avm's hardened unit, whatever was
    recorded: foreign unit files, a reload pending, hardening not in force, and (when
    ``release`` is given) a main process that is not the unprivileged agent running it."""
    name = LAYOUT.unit_name(profile)
    out: list[Problem] = [
        (
            path,
            f"unit file avm did not write, loaded for {name}"
            if path in unit.files
            else f"unit file avm did not write, on disk for {name} (loaded at the next daemon-reload)",
            None,
            digest,
        )
        for path, digest in foreign_files(profile, unit).items()
    ]
    if (
        unit.LoadState != "loaded"
    ):  # nothing of the template is loaded: its files are judged, not its properties
        return out
    if unit.need_reload:
        out.append(
            (
                name,
                "unit files changed on disk since systemd loaded them",
                "NeedDaemonReload=no",
                "NeedDaemonReload=yes",
            )
        )
    out += [
        (f"{name} {prop}", "hardening the unit template grants is not in force", want, got)
        for prop, want, got in hardening_gaps(profile, unit)
    ]
    if release is not None:
        out += [
            (f"{name} main process {key}", "the running process is not the hardened unit", want, got)
            for key, want, got in process_gaps(profile, unit, uid, release)
        ]
    return out
