"""Deterministic archives, written one way: tar members and newc cpio trees.

Every member is owned by root (uid/gid 0, no user or group names) with mtime 0 unless given, so
the same input gives the same bytes: OCI layers, job result frames and initramfs images are
content-addressed by those bytes.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

SETID = stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True)
class Member:
    """One tar member: a regular file (``data``), a directory, or a symlink to ``symlink_to``."""

    name: str
    data: bytes = b""
    mode: int = 0o644
    directory: bool = False
    symlink_to: str | None = None


def write_tar(fileobj: BinaryIO, members: Iterable[Member]) -> None:
    """Write ``members`` in the order given as an uncompressed POSIX (PAX) tar."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mode = m.mode
            if m.directory:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif m.symlink_to is not None:
                info.type, info.linkname = tarfile.SYMTYPE, m.symlink_to
                tar.addfile(info)
            else:
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))


def tar_bytes(members: Iterable[Member]) -> bytes:
    """``write_tar`` into memory."""
    buf = io.BytesIO()
    write_tar(buf, members)
    return buf.getvalue()


def write_cpio(root: Path, out: Path, stripped: list[str] | None = None) -> int:
    """Write the tree ``root`` as an uncompressed newc cpio (the format the kernel unpacks as an
    initramfs), entries sorted, all owned by root. Returns its size.

    Set-uid and set-gid bits never reach a guest: they are cleared, and each such path is
    appended to ``stripped``."""
    ino = 1
    with open(out, "wb") as fh:

        def entry(name: str, mode: int, data: bytes) -> None:
            nonlocal ino
            nb = name.encode() + b"\0"
            fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
            fh.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nb)
            fh.write(b"\0" * (-(110 + len(nb)) % 4) + data + b"\0" * (-len(data) % 4))
            ino += 1

        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in [*sorted(dirnames), *sorted(filenames)]:
                path = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                st = os.lstat(path)
                mode = st.st_mode
                if stat.S_ISLNK(mode):
                    entry(rel, mode, os.readlink(path).encode())
                    continue
                if mode & SETID:
                    mode &= ~SETID
                    if stripped is not None:
                        stripped.append(rel)
                if stat.S_ISDIR(mode):
                    entry(rel, mode, b"")
                elif stat.S_ISREG(mode):
                    entry(rel, mode, Path(path).read_bytes())
        entry("TRAILER!!!", 0, b"")
        return fh.tell()
