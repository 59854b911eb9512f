"""Probe, from inside each profile's sandbox, whether its controls are in force. Runs as root.

argv[1] is JSON ``{"profiles": [...], "timeout": seconds}``; one JSON document goes to stdout.
For each profile whose unit ``agent-gateway@<p>.service`` runs, a child process is forked that
joins the unit's network namespace and every writable cgroup the unit's main process is in
(so cgroup-BPF ``IPAddressDeny=`` and the cgroup limits apply to it as to the agent), drops
to the unit's user and group with no supplementary groups (so ``meta skuid`` rules match it),
and connects to a TCP listener this probe started on the host's own non-loopback address: a
destination in no allowlist. The same connection made by the probe itself, outside the
sandbox, is the control that shows the listener was reachable. The limits are the files the
kernel enforces for the unit's cgroups (cgroup2 ``memory.max``/``pids.max``/``cpu.max``, or the
v1 ``memory.limit_in_bytes``/``pids.max``/``cpu.cfs_*``), next to what systemd was told.
Nothing outlives the probe: the listener closes, the child exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import socket
import subprocess
import sys
from typing import Any

PROPS = "Id,ActiveState,MainPID,User,Group,ControlGroup,MemoryMax,TasksMax,CPUQuotaPerSecUSec"
CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded once, before the children fork


def show(units: list[str]) -> dict[str, dict[str, str]]:
    """``systemctl show`` of every unit in one call: Id -> properties."""
    if not units:
        return {}
    out = subprocess.run(
        ["systemctl", "show", "--no-pager", "-p", PROPS, *units], capture_output=True, text=True, timeout=60
    ).stdout
    found = {}
    for block in out.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if props.get("Id"):
            found[props["Id"]] = props
    return found


def cgroup_mounts() -> list[tuple[str, str, set[str], bool]]:
    """(mount point, mount root, controllers or {"2"} for cgroup2, writable) of every cgroup mount."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            fstype, opts = tail[0], set(tail[2].split(","))
            writable = "rw" in fields[5].split(",")
            if fstype == "cgroup2":
                found.append((fields[4], fields[3], {"2"}, writable))
            elif fstype == "cgroup":
                found.append((fields[4], fields[3], opts, writable))
    return found


def unit_cgroups(pid: int) -> dict[str, tuple[str, bool]]:
    """Per hierarchy (``2``, ``memory``, ``pids``, ``cpu``, ``name=systemd``, ...): the directory
    of ``pid``'s cgroup and whether it can be joined, from ``/proc/PID/cgroup``."""
    mounts = cgroup_mounts()
    out: dict[str, tuple[str, bool]] = {}
    with open(f"/proc/{pid}/cgroup") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            keys = {"2"} if controllers == "" else set(controllers.split(","))
            for point, root, opts, writable in mounts:
                if keys <= opts:
                    rel = path[len(root) :] if root != "/" and path.startswith(root) else path
                    for key in keys:
                        out[key] = (point.rstrip("/") + rel, writable)
                    break
    return out


def read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def kernel_limits(groups: dict[str, tuple[str, bool]]) -> dict[str, dict[str, str | None]]:
    """The limit files of the unit's cgroups: cgroup2 first, then the v1 controller's."""

    def first(*candidates: tuple[str, str]) -> dict[str, str | None]:
        for key, name in candidates:
            if key in groups:
                path = os.path.join(groups[key][0], name)
                value = read(path)
                if value is not None:
                    return {"file": path, "value": value}
        tried = [os.path.join(groups[k][0], n) for k, n in candidates if k in groups]
        return {"file": ", ".join(tried) or "no cgroup of the unit has it", "value": None}

    cpu = first(("2", "cpu.max"), ("cpu", "cpu.cfs_quota_us"))
    if cpu["value"] is not None and cpu["file"] and cpu["file"].endswith("cpu.cfs_quota_us"):
        period = read(os.path.join(groups["cpu"][0], "cpu.cfs_period_us"))
        cpu["value"] = f"{cpu['value']} {period}"
    return {
        "memory": first(("2", "memory.max"), ("memory", "memory.limit_in_bytes")),
        "tasks": first(("2", "pids.max"), ("pids", "pids.max")),
        "cpu": cpu,
    }


def own_address() -> str | None:
    """The first global IPv4 address of this host (never loopback)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True, timeout=10
    ).stdout
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                return str(info["local"])
    return None


def connect(addr: tuple[str, int], timeout: float) -> str:
    """``connected``, ``timeout`` or ``errno N: text``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
        return "connected"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"errno {exc.errno}: {exc.strerror}"
    finally:
        sock.close()


def start_sandboxed_connect(
    main_pid: int,
    groups: dict[str, tuple[str, bool]],
    uid: int,
    gid: int,
    addr: tuple[str, int],
    timeout: float,
) -> tuple[int, int]:
    """Fork a child into the unit's netns and cgroups, as its user; it connects to ``addr``.
    Returns (pid, read end of its report pipe): the children of all profiles run at once."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: every failure is reported, never raised past here
        os.close(read_end)
        report: dict[str, Any] = {"joined": []}
        try:
            fd = os.open(f"/proc/{main_pid}/ns/net", os.O_RDONLY)
            if LIBC.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns(net) failed")
            os.close(fd)
            for key, (path, writable) in sorted(groups.items()):
                if writable:
                    with open(os.path.join(path, "cgroup.procs"), "w") as fh:
                        fh.write(str(os.getpid()))
                    report["joined"].append(key)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            report["uid"], report["gid"] = os.getuid(), os.getgid()
            report["result"] = connect(addr, timeout)
        except Exception as exc:  # reported as the probe's own error
            report["error"] = f"{type(exc).__name__}: {exc}"
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    return pid, read_end


def collect(pid: int, read_end: int) -> dict[str, Any]:
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    doc: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    return doc


def probe(
    unit: dict[str, str], address: str | None, timeout: float, stack: contextlib.ExitStack
) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """Read the unit's cgroups and limits, open its listener (closed by ``stack``), make the
    control connection and start the sandboxed one. Returns the report and the pending child."""
    out: dict[str, Any] = {"unit": unit}
    main_pid = int(unit.get("MainPID", "0") or 0)
    if unit.get("ActiveState") != "active" or main_pid == 0:
        out["error"] = f"unit not running (ActiveState={unit.get('ActiveState')}, MainPID={main_pid})"
        return out, None
    groups = unit_cgroups(main_pid)
    out["cgroups"] = {k: v[0] for k, v in sorted(groups.items())}
    out["limits"] = kernel_limits(groups)
    if address is None:
        out["error"] = "the host has no global IPv4 address to probe"
        return out, None
    try:
        user = pwd.getpwnam(unit.get("User") or "")
    except KeyError:
        out["error"] = f"unit user {unit.get('User')!r} does not exist"
        return out, None
    listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    listener.bind((address, 0))
    listener.listen(8)
    dest = (address, listener.getsockname()[1])
    out["destination"] = f"{dest[0]}:{dest[1]}"
    out["control"] = connect(dest, timeout)
    return out, start_sandboxed_connect(main_pid, groups, user.pw_uid, user.pw_gid, dest, timeout)


def main() -> None:
    request = json.loads(sys.argv[1])
    address = own_address()
    timeout = float(request.get("timeout", 3.0))
    units = show([f"agent-gateway@{p}.service" for p in request["profiles"]])
    profiles: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        pending = {}
        for name in request["profiles"]:
            profiles[name], child = probe(
                units.get(f"agent-gateway@{name}.service", {}), address, timeout, stack
            )
            if child is not None:
                pending[name] = child
        for name, (pid, read_end) in pending.items():
            profiles[name]["sandboxed"] = collect(pid, read_end)
    print(json.dumps({"address": address, "profiles": profiles}, sort_keys=True))


if __name__ == "__main__":
    main()
