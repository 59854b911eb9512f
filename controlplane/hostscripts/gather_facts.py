"""Tier-1 facts gatherer, run on the host as ``python3 -c <this file> REQUEST``. Reads only.

Prints one JSON document (parsed by ``controlplane.promote.facts.parse``). Dependency-free on purpose:
the golden image ships python3 and nothing else is assumed. Every release entry is recorded
with ``lstat`` (a symlinked directory is an entry, not something to walk into), and each
profile's unit is read as systemd loaded it: every unit file and drop-in, and the effective
security properties.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import stat
import subprocess
import sys
from typing import Any

# The effective properties ``avm status`` compares (``systemctl show`` names).
_PROPERTY_WORDS = """
    User Group DynamicUser SupplementaryGroups NoNewPrivileges CapabilityBoundingSet
    AmbientCapabilities SecureBits ProtectSystem ProtectHome ProtectKernelTunables
    ProtectKernelModules ProtectKernelLogs ProtectControlGroups ProtectClock ProtectHostname
    ProtectProc ProcSubset PrivateTmp PrivateDevices PrivateNetwork PrivateUsers PrivateIPC
    PrivateMounts RestrictSUIDSGID RestrictNamespaces RestrictRealtime RemoveIPC
    LockPersonality MemoryDenyWriteExecute KeyringMode UMask SystemCallFilter
    SystemCallArchitectures SystemCallErrorNumber RestrictAddressFamilies IPAddressDeny
    IPAddressAllow IPIngressFilterPath IPEgressFilterPath NetworkNamespacePath ReadWritePaths
    ReadOnlyPaths InaccessiblePaths ExecPaths NoExecPaths BindPaths BindReadOnlyPaths
    TemporaryFileSystem RootDirectory RootImage WorkingDirectory DevicePolicy DeviceAllow
    ExecStart ExecStartPre ExecStartPost ExecCondition ExecReload ExecStop ExecStopPost
    Environment EnvironmentFiles UnsetEnvironment PassEnvironment MemoryMax MemoryHigh
    MemorySwapMax TasksMax CPUQuotaPerSecUSec LimitNOFILE LimitNPROC Delegate
"""
UNIT_PROPERTIES = tuple(_PROPERTY_WORDS.split())
PROC_FIELDS = ("Uid", "Gid", "NoNewPrivs", "CapEff", "CapBnd", "Seccomp")
STATE_PROPERTIES = (
    "MainPID",
    "LoadState",
    "Id",
    "ActiveState",
    "SubState",
    "NRestarts",
    "FragmentPath",
    "DropInPaths",
    "NeedDaemonReload",
)
# Credentials are read from the loaded files: systemd 252 prints LoadCredential as "[unprintable]".
CREDENTIAL_KEYS = (
    "LoadCredential",
    "LoadCredentialEncrypted",
    "SetCredential",
    "SetCredentialEncrypted",
    "ImportCredential",
)


def digest(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return "sha256:" + hashlib.sha256(fh.read()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return "unreadable:" + (exc.strerror or type(exc).__name__)


def meta(path: str) -> str | None:
    """``TYPE MODE UID GID`` of an entry, not following symlinks; None when absent."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    kind = (
        "d"
        if stat.S_ISDIR(st.st_mode)
        else "f"
        if stat.S_ISREG(st.st_mode)
        else "l"
        if stat.S_ISLNK(st.st_mode)
        else "o"
    )
    return f"{kind} {stat.S_IMODE(st.st_mode):04o} {st.st_uid} {st.st_gid}"


def tree(root: str) -> tuple[dict[str, str | None], dict[str, str]]:
    """(content, metadata) of every entry under root: files by digest, symlinks by target."""
    content: dict[str, str | None] = {}
    metadata: dict[str, str] = {".": meta(root) or "?"}
    for base, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(base, name)
            rel = os.path.relpath(full, root)
            metadata[rel] = meta(full) or "?"
            if os.path.islink(full):
                content[rel] = "symlink:" + os.readlink(full)
            elif os.path.isfile(full):
                content[rel] = digest(full)
            elif not os.path.isdir(full):
                content[rel] = "special"
    return content, metadata


RUNTIME_FIELDS = re.compile(r" ; (?:start_time|stop_time)=\[[^\]]*\]| ; (?:pid|code|status)=[^ ;}]*")


# Set-valued properties systemd prints in no stable order: compared as sorted words.
_SET_WORDS = (
    "IPAddressDeny IPAddressAllow RestrictAddressFamilies SystemCallFilter CapabilityBoundingSet "
    "AmbientCapabilities SupplementaryGroups ReadWritePaths ReadOnlyPaths InaccessiblePaths "
    "ExecPaths NoExecPaths"
)
SET_VALUED = frozenset(_SET_WORDS.split())


def normalise(name: str, value: str) -> str:
    """Drop what changes on every start (pids, timestamps, exit status) from Exec* values, and
    put set-valued properties in one order."""
    if name.startswith("Exec"):
        return RUNTIME_FIELDS.sub("", value)
    if name in SET_VALUED:
        return " ".join(sorted(value.split()))
    return value


def credentials(files: list[str]) -> list[str]:
    out: list[str] = []
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        for line in lines:
            key = line.split("=", 1)[0].strip()
            if key in CREDENTIAL_KEYS:
                out.append(line.strip())
    return out


def process(pid: str) -> dict[str, str] | None:
    """What the kernel says about the unit's main process: the truth of what runs."""
    if not pid or pid == "0":
        return None
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in PROC_FIELDS:
                    out[key] = value.split()[0] if key in ("Uid", "Gid") else value.strip()
        out["cwd"] = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    return out


# Where systemd looks for a system unit and its drop-ins (systemd.unit(5)).
SEARCH_PATHS = (
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/run/systemd/generator.early",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/run/systemd/generator",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/run/systemd/generator.late",
)


def on_disk(profile: str) -> dict[str, str | None]:
    """Every file on disk that systemd would load for the profile's unit at the next reload."""
    instance = "agent-gateway@" + profile + ".service"
    names = [instance, "agent-gateway@.service"]
    dropin_dirs = [
        instance + ".d",
        "agent-gateway@.service.d",
        "agent-.service.d",
        "agent-gateway-.service.d",
        "service.d",
    ]
    found: dict[str, str | None] = {}
    for base in SEARCH_PATHS:
        for name in names:
            path = os.path.join(base, name)
            if os.path.lexists(path):
                found[path] = digest(path)
        for name in dropin_dirs:
            directory = os.path.join(base, name)
            try:
                entries = sorted(os.listdir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.endswith(".conf"):
                    found[os.path.join(directory, entry)] = digest(os.path.join(directory, entry))
    return found


def systemctl_show(ids: list[str], props: list[str]) -> tuple[list[dict[str, str]], str | None]:
    try:
        proc = subprocess.run(
            ["systemctl", "show", "--no-pager", "-p", ",".join(props), *ids],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], str(exc)
    blocks = []
    for block in proc.stdout.strip().split("\n\n"):
        kv = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if kv:
            blocks.append(kv)
    return blocks, None


def units(profiles: list[str]) -> tuple[dict[str, Any], str | None]:
    if not profiles:
        return {}, None
    ids = ["agent-gateway@" + n + ".service" for n in profiles]
    blocks, error = systemctl_show(ids, [*STATE_PROPERTIES, *UNIT_PROPERTIES])
    out: dict[str, Any] = {}
    for kv in blocks:
        if not kv.get("Id"):
            continue
        loaded = [p for p in [kv.get("FragmentPath", ""), *kv.get("DropInPaths", "").split()] if p]
        out[kv["Id"]] = {
            **{k: kv.get(k, "") for k in ("Id", "LoadState", "ActiveState", "SubState", "NRestarts")},
            "need_reload": kv.get("NeedDaemonReload") == "yes",
            "fragment": kv.get("FragmentPath", ""),
            "files": {p: digest(p) for p in loaded},
            "on_disk": on_disk(kv["Id"][len("agent-gateway@") : -len(".service")]),
            "properties": {k: normalise(k, kv.get(k, "")) for k in UNIT_PROPERTIES},
            "credentials": credentials(loaded),
            "process": process(kv.get("MainPID", "")),
        }
    return out, error


def main() -> None:
    req = json.loads(sys.argv[1])
    rel_root, prof_root, etc, unit_dir = req["releases"], req["profiles_dir"], req["etc"], req["unit_dir"]
    names = set(req["profiles"])
    if os.path.isdir(prof_root):
        names |= set(os.listdir(prof_root))
    profiles, wanted = {}, set(req["releases_wanted"])
    for name in sorted(names):
        link = os.path.join(prof_root, name, "current")
        target = os.readlink(link) if os.path.islink(link) else None
        if target:
            wanted.add(os.path.basename(target.rstrip("/")))
        try:
            uid: int | None = pwd.getpwnam("agent-" + name).pw_uid
        except KeyError:
            uid = None
        profiles[name] = {
            "current": target,
            "env": digest(os.path.join(etc, name + ".env")),
            "policy": digest(os.path.join(etc, name + ".policy.json")),
            "dropin": digest(os.path.join(unit_dir, "agent-gateway@" + name + ".service.d", "avm.conf")),
            "user": uid is not None,
            "uid": uid,
            "link_meta": meta(link),
            "dir_meta": meta(os.path.join(prof_root, name)),
        }
    releases, release_meta = {}, {}
    for sha in sorted(wanted):
        path = os.path.join(rel_root, sha)
        if os.path.isdir(path) and not os.path.islink(path):
            releases[sha], release_meta[sha] = tree(path)
        elif os.path.lexists(path):
            releases[sha], release_meta[sha] = {}, {".": meta(path) or "?"}
    layout = {}
    for path in (os.path.dirname(rel_root), rel_root, prof_root):
        layout[path] = meta(path)
    unit_facts, systemctl_error = units(sorted(profiles))
    then = None
    if req.get("then"):  # a second read-only program of avm's, in the same round trip
        try:
            done = subprocess.run(
                req["then"], capture_output=True, text=True, timeout=req.get("then_timeout", 120)
            )
            then = {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-2000:]}
        except (OSError, subprocess.TimeoutExpired) as exc:
            then = {"rc": -1, "stdout": "", "stderr": str(exc)}
    print(
        json.dumps(
            {
                "unit_template": digest(os.path.join(unit_dir, "agent-gateway@.service")),
                "profiles": profiles,
                "releases": releases,
                "release_meta": release_meta,
                "layout_meta": layout,
                "units": unit_facts,
                "systemctl_error": systemctl_error,
                "then": then,
            }
        )
    )


if __name__ == "__main__":
    main()
