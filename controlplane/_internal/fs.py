"""Files written safely, one way each: replaced atomically, or created new and never overwritten.

* ``atomic_writer`` / ``write_atomic``: a temporary file in the same directory, fsync, then
  rename over the target. A reader sees the old bytes or the new bytes, never a mix; a crash
  leaves at most a hidden temporary file, never a half-written target.
* ``write_new``: ``O_CREAT | O_EXCL``: of two concurrent writers exactly one wins and the other
  gets ``FileExistsError``; keys and markers are never overwritten.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(
    path: Path, mode: int = 0o644, *, parent_mode: int = 0o700, durable: bool = True
) -> Iterator[BinaryIO]:
    """Stream the new contents of ``path`` into the yielded file; on a clean exit it replaces
    ``path`` (file ``mode``), on an exception the target is untouched and the temporary removed.
    Missing parents are created with ``parent_mode``. ``durable=False`` skips the fsyncs (only
    for bulk writes whose loss on power failure is acceptable, e.g. a benchmark's chain)."""
    path.parent.mkdir(mode=parent_mode, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def write_atomic(
    path: Path, data: bytes, mode: int = 0o644, *, parent_mode: int = 0o700, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` (see ``atomic_writer``)."""
    with atomic_writer(path, mode, parent_mode=parent_mode, durable=durable) as out:
        out.write(data)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data`` and ``mode``; raises ``FileExistsError`` if it exists (also
    when another writer created it a moment ago). The bytes are fsynced before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
