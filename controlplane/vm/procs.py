"""Host facts a VM's lifecycle relies on: processes by pid and by marker, TCP ports, signals.

A VM's host process is found two ways: by the pid recorded at boot, and by scanning
``/proc/*/cmdline`` for the VM's unique marker (so a reused or lost pid cannot hide a leftover).
A zombie counts as gone: it holds no resources but a process-table slot.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import time
from pathlib import Path

from controlplane.errors import UsageError

PROC = Path("/proc")


def cmdline(pid: int) -> str | None:
    """The NUL-separated command line of ``pid`` joined with spaces, or None if it is gone."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def _is_zombie(pid: int) -> bool:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # the state letter follows the ")" that closes the command name
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def alive(pid: int | None, marker: str) -> bool:
    """Whether ``pid`` runs and is ours (its command line carries ``marker``)."""
    if pid is None:
        return False
    line = cmdline(pid)
    return bool(line) and marker in (line or "") and not _is_zombie(pid)


def pids_with_marker(marker: str) -> list[int]:
    """Every live (non-zombie) process whose command line contains ``marker``."""
    me = os.getpid()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        line = cmdline(int(entry.name))
        if line and marker in line and not _is_zombie(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child (it is not when the CLI started it)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_pids(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: list[int], marker: str, deadline_s: float) -> bool:
    """Wait until none of ``pids`` runs as ours; True if they are all gone in time."""
    end = time.monotonic() + deadline_s
    while True:
        for pid in pids:
            reap(pid)
        if not any(alive(pid, marker) for pid in pids):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP listener could bind ``host:port`` now (connections in TIME_WAIT from a
    stopped VM do not count: only another listener makes the port taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def listening(port: int) -> bool:
    """Whether any socket on this host listens on TCP ``port`` (from /proc/net/tcp{,6}).

    Teardown uses this rather than a test bind: connections a stopped VM left in TIME_WAIT
    are not a leftover, a listener is."""
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_not_listening(port: int, deadline_s: float) -> bool:
    """Wait until nothing listens on ``port`` (the kernel closes a killed process's sockets
    asynchronously); True if it is free in time."""
    end = time.monotonic() + deadline_s
    while listening(port):
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def require_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise ``UsageError('port-taken')`` if something already listens on ``host:port``."""
    if not port_free(port, host):
        raise UsageError(
            "port-taken",
            f"SSH port {host}:{port} is already in use",
            hint="pick another --ssh-port, or omit it to let avm choose a free one",
            details={"expected": f"{host}:{port} free", "actual": "in use"},
        )


def boot_time() -> float:
    """Host boot time (wall clock), to turn a process's start ticks into an uptime."""
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0
