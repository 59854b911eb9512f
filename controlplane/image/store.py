"""The image store's housekeeping: one build per recipe at a time, atomic publish, safe cleanup.

A build runs in ``<store>/.build-<key>-*`` while holding ``<store>/.<key>.lock`` and is renamed
to ``<store>/<key>`` only when complete. Removing a build directory refuses to cross a mount:
``shutil.rmtree`` would otherwise empty a /dev or /proc left mounted inside a chroot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from controlplane._internal.progress import Progress
from controlplane.errors import OperationalError

_OCTAL = re.compile(r"\\([0-7]{3})")


def publish(work: Path, final: Path) -> None:
    """Move the finished build into place; an older image of the recipe (``--force``) is removed."""
    for scratch in ("customize-hook", "customize-report.json", "pins"):
        (work / scratch).unlink(missing_ok=True)
    work.chmod(0o755)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name[:12]}-{os.getpid()}")
        os.rename(final, old)
    os.rename(work, final)
    if old is not None:
        remove_tree(old)


def remove_stale_builds(store: Path, key: str, say: Progress) -> list[str]:
    """Remove the temp and retired directories a killed build of recipe ``key`` left behind.

    Call only while holding that recipe's lock: then no build of it can be using them.
    """
    removed = []
    for stale in sorted([*store.glob(f".build-{key[:12]}-*"), *store.glob(f".old-{key[:12]}-*")]):
        say(f"image build: removing {stale.name}, left by a build that was killed")
        remove_tree(stale)
        removed.append(stale.name)
    return removed


def remove_tree(path: Path) -> None:
    """``rm -rf`` a build directory, refusing if anything is mounted inside it.

    ``shutil.rmtree`` crosses mount points: a leftover /dev or /proc bind inside a chroot would
    be emptied on the host. Raises ``OperationalError('build-dir-mounted')`` instead.
    """
    mounts = mounts_under(path)
    if mounts:
        raise OperationalError(
            "build-dir-mounted",
            f"{path} still has mounts inside ({', '.join(mounts)}); not removing it",
            hint="unmount them (umount -R) and delete the directory by hand",
            details={"mounts": mounts},
        )
    shutil.rmtree(path)


def mounts_under(path: Path) -> list[str]:
    base = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), line.split()[4])  # \040 is a space
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return found


@contextlib.contextmanager
def exclusive(lock: Path, say: Progress) -> Iterator[None]:
    with lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("image build: another build of this recipe is running; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
