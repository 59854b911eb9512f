"""Atomic file writes: a temporary file in the same directory, fsync, then rename over the target.

A reader sees the old bytes or the new bytes, never a mix; a crash leaves at most a hidden
temporary file, never a half-written target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, parent_mode: int = 0o700) -> None:
    """Replace ``path`` with ``data`` (file ``mode``), creating missing parents with ``parent_mode``."""
    path.parent.mkdir(mode=parent_mode, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
