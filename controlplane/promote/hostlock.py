"""The apply lock on a host: one mutating avm at a time, and a dead holder never wedges it.

The lock is a directory created with ``mkdir`` (atomic on every POSIX filesystem) holding an
``owner.json``. A second promote finds it and is refused, naming the holder. A lock is stale,
and may be taken over, when its holder was on this control machine and that process is gone
(``kill -9`` mid-apply), or when its lease expired. A takeover is reported to the caller so it
lands in the receipt.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from controlplane.errors import OperationalError, RefusedError
from controlplane.transport.base import Transport

LOCK_DIR = "/var/lib/avm/apply.lock"
LEASE_S = 3600.0


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "control_host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start(pid),
        "acquired_at": time.time(),
        "lease_s": LEASE_S,
    }


def stale_reason(owner: dict[str, Any], now: float | None = None) -> str | None:
    """Why a recorded holder no longer holds the lock, or None if it may still be alive."""
    now = time.time() if now is None else now
    if now - float(owner.get("acquired_at", 0)) > float(owner.get("lease_s", LEASE_S)):
        return "lease expired"
    if owner.get("control_host") == socket.gethostname():
        pid = int(owner.get("pid", -1))
        if pid > 0 and _process_start(pid) != owner.get("pid_start"):
            return f"holder pid {pid} on this machine is gone"
    return None


@contextmanager
def hold(host: Transport, purpose: str, lock_dir: str = LOCK_DIR) -> Iterator[dict[str, Any]]:
    """Hold the host's apply lock for the block. Yields facts for the receipt.

    Raises ``RefusedError('host-locked')`` if a live holder has it (nothing is changed).
    """
    facts: dict[str, Any] = {"lock": lock_dir, "purpose": purpose, "took_over": None}
    owner = {**_owner(), "purpose": purpose}
    host.run(["mkdir", "-p", os.path.dirname(lock_dir)], timeout=30).check()
    if not host.run(["mkdir", lock_dir], timeout=30).ok:
        try:
            current = json.loads(host.get(f"{lock_dir}/owner.json"))
        except (OperationalError, ValueError):
            current = {}  # created but owner not written yet: only a lease can expire it
            current.setdefault("acquired_at", time.time())
        reason = stale_reason(current)
        if reason is None:
            raise RefusedError(
                "host-locked",
                f"another avm holds the apply lock on {host.url} ({current.get('purpose', '?')} "
                f"by pid {current.get('pid', '?')} on {current.get('control_host', '?')})",
                hint="wait for it to finish; a crashed holder's lock is taken over automatically",
                details={"holder": current},
            )
        # Move the stale lock aside atomically, then race for a fresh mkdir: of several
        # concurrent takers exactly one wins.
        aside = f"{lock_dir}.stale-{os.getpid()}-{time.time_ns()}"
        if (
            not host.run(["mv", "-T", lock_dir, aside], timeout=30).ok
            or not host.run(["mkdir", lock_dir], timeout=30).ok
        ):
            raise RefusedError(
                "host-locked",
                f"another avm took over the stale apply lock on {host.url} first",
                hint="retry once it has finished",
            )
        host.run(["rm", "-rf", aside], timeout=30)
        facts["took_over"] = {"previous": current, "reason": reason}
    host.put(json.dumps(owner, sort_keys=True).encode(), f"{lock_dir}/owner.json", mode=0o600)
    try:
        yield facts
    finally:
        host.run(["rm", "-rf", lock_dir], timeout=30)
