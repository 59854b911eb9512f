"""Waiting for an SSH server: its ``SSH-2.0`` banner, not an open port, says it is up."""

from __future__ import annotations

import socket
import time

from controlplane.errors import OperationalError


def wait_for_ssh(host: str, port: int, deadline_s: float) -> str:
    """Wait up to ``deadline_s`` seconds until an SSH server greets on host:port, and return its
    ``SSH-2.0-...`` banner. An open port is not enough (a VM's port forward accepts before
    sshd runs). Raises ``OperationalError('host-unreachable')`` when the time is up."""
    end = time.monotonic() + deadline_s
    last = "no attempt"
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise OperationalError(
                "host-unreachable",
                f"no SSH banner from {host}:{port} within {deadline_s:g}s (last: {last})",
                hint="the machine may still be booting, or sshd failed to start; check its console log",
                details={"host": host, "port": port, "deadline_s": deadline_s, "last": last},
            )
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 2.0)) as sock:
                sock.settimeout(min(max(end - time.monotonic(), 0.05), 2.0))
                banner = _read_banner(sock)
            if banner is not None:
                return banner
            last = "connection closed without an SSH-2.0 banner"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(min(0.1, max(end - time.monotonic(), 0)))


def _read_banner(sock: socket.socket) -> str | None:
    buf = b""
    while len(buf) < 8192:
        chunk = sock.recv(1024)
        if not chunk:
            return None
        buf += chunk
        # RFC 4253 4.2: a server may send other lines before the version line.
        for line in buf.split(b"\n")[:-1]:
            if line.startswith(b"SSH-2.0-"):
                return line.rstrip(b"\r").decode("ascii", "replace")
    return None
