"""A private cgroup per container, so every process of it can be found and killed.

Two lab findings make this necessary (``shared/lab/fleet.md`` 3.2, and re-checked here):
with ``--keep-unit`` and no machined all containers share the caller's cgroup, which leaves
about one boot in ten ``degraded`` (``Failed at step CGROUP``); and a ``kill -9`` of
``systemd-nspawn`` leaves the container's init and services running. The cgroup tree is the
only reliable list of what is left. On a cgroup-v1 hybrid host (this one) the container needs
both the ``name=systemd`` and the ``unified`` hierarchy; on a pure v2 host, the root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def hierarchies() -> list[Path]:
    """The cgroup hierarchies a systemd container must be placed in, on this host."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # pure cgroup v2
        return [CGROUP_ROOT]
    return [CGROUP_ROOT / h for h in ("systemd", "unified") if (CGROUP_ROOT / h / "cgroup.procs").exists()]


def paths(group: str) -> list[Path]:
    return [h / "avm" / group for h in hierarchies()]


def create(group: str) -> list[Path]:
    made = []
    for path in paths(group):
        path.mkdir(parents=True, exist_ok=True)
        made.append(path)
    return made


def procs_files(group: str) -> list[str]:
    """The ``cgroup.procs`` files a child writes itself into (computed before fork)."""
    return [str(p / "cgroup.procs") for p in paths(group)]


def join_in_child(procs: list[str]) -> None:
    """``preexec_fn``: move the forked child into the group before it execs.

    Only raw ``os.open``/``os.write`` run here, which is safe between fork and exec even when
    the parent has threads (paramiko's).
    """
    pid = str(os.getpid()).encode()
    for path in procs:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


def members(group: str) -> list[int]:
    """Every process anywhere in the group's tree, in any hierarchy."""
    found: set[int] = set()
    for root in paths(group):
        if not root.exists():
            continue
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                found.update(int(x) for x in procs.read_text().split())
    return sorted(found)


def kill_all(group: str, deadline_s: float = 5.0) -> list[int]:
    """SIGKILL every member until the group is empty; returns the pids still there at the end."""
    end = time.monotonic() + deadline_s
    while True:
        left = members(group)
        if not left or time.monotonic() >= end:
            return left
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def remove(group: str) -> list[str]:
    """rmdir the group's directories bottom-up; returns the directories that could not go."""
    stuck = []
    for root in paths(group):
        if not root.exists():
            continue
        for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                path.rmdir()
        try:
            root.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            stuck.append(str(root))
    return stuck
