"""The content classifier of the host's job gateway: the reference classifier as its own process.

When a job's listener lists an ``inspect: true`` name, ``ensure(root)`` starts
``python -m controlplane.boundary.classifyd`` on a unix socket in ``<root>/classifier/`` (0700,
root's: inside the gateway's own directory, in no job's namespace; Envoy reaches it by path, the
guest cannot) and waits for the socket, before the listener that needs it is added. Its pid is
recorded beside the socket, so whichever job run removes the last inspected listener stops it
(``stop``). A classifier that died is no verdict: the gateway's ``ext_authz`` filter fails
closed (``classifier-unavailable``, 403), it never lets a request through unasked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane.boundary import envoy
from controlplane.errors import OperationalError

SOCKET_WAIT_S = 15.0
_RUNNING: dict[Path, subprocess.Popen[bytes]] = {}  # classifiers this process started (reaped on stop)


def socket_path(root: Path) -> Path:
    """Where the gateway rooted at ``root`` reaches its classifier."""
    return root / "classifier" / "classifier.sock"


def _pid(root: Path) -> int | None:
    try:
        return int((root / "classifier" / "pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (not a zombie); the host gateway's Envoy uses it too."""
    if not pid:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def running(root: Path) -> bool:
    """The recorded classifier process is alive and its socket exists."""
    return alive(_pid(root)) and socket_path(root).is_socket()


def ensure(root: Path) -> Path:
    """Start the classifier unless it runs; returns its socket. Raises
    ``OperationalError('classifier-not-running')`` when the socket does not appear."""
    sock = socket_path(root)
    if running(root):
        return sock
    stop(root)  # a dead one's pid file and socket
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock.parent.chmod(0o700)
    argv = [sys.executable, "-m", "controlplane.boundary.classifyd", "--listen", f"unix:{sock}"]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    _RUNNING[root] = proc
    write_atomic(sock.parent / "pid", f"{proc.pid}\n".encode(), 0o600)
    if not envoy.wait_until(lambda: sock.is_socket() or proc.poll() is not None, SOCKET_WAIT_S, 0.05) or (
        proc.poll() is not None
    ):
        stop(root)
        err = proc.stderr.read().decode(errors="replace")[-800:] if proc.stderr else ""
        raise OperationalError(
            "classifier-not-running",
            f"the job gateway's classifier did not open {sock} within {SOCKET_WAIT_S:.0f} s",
            hint=f"its stderr: {err or '(empty)'}",
        )
    return sock


def stop(root: Path) -> None:
    """Stop the classifier (nothing when none runs) and remove its pid file and socket."""
    proc = _RUNNING.pop(root, None)
    pid = proc.pid if proc is not None else _pid(root)
    if alive(pid):
        assert pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if proc is not None:
            proc.wait(10)
        envoy.wait_until(lambda: not alive(pid), 10.0, 0.05)
    elif proc is not None:
        proc.wait(10)
    if proc is not None and proc.stderr is not None:
        proc.stderr.close()
    for path in (root / "classifier" / "pid", socket_path(root)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
