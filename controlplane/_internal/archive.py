"""Deterministic archives, written one way each: tar members and newc cpio trees.

The same members give the same bytes on any machine and any Python version, because the tar
headers are written here rather than by ``tarfile``: USTAR, mtime 0, uid/gid 0, empty
uname/gname, and a PAX ``x`` header only where USTAR cannot hold a value (a path or link target
over 100 bytes or not ASCII, a file of 8 GiB or more). Release bundles, OCI layers and job
result frames are content-addressed and signed by these bytes (tests/test_known_answers.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BLOCK = 512
SETID = stat.S_ISUID | stat.S_ISGID
_PAX_NAME = b"././@PaxHeader"


@dataclass(frozen=True)
class Member:
    """One tar member, in the order given: a regular file (``data``), a directory, or a symlink
    (``symlink``: ``data`` is the link target's bytes)."""

    name: str
    data: bytes = b""
    mode: int = 0o644
    directory: bool = False
    symlink: bool = False


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _header(name: bytes, *, mode: int, size: int, typeflag: bytes, linkname: bytes = b"") -> bytes:
    fields = [
        name.ljust(100, b"\0"),
        _octal(mode, 8),
        _octal(0, 8),  # uid
        _octal(0, 8),  # gid
        _octal(size, 12),
        _octal(0, 12),  # mtime
        b" " * 8,  # checksum placeholder
        typeflag,
        linkname.ljust(100, b"\0"),
        b"ustar\x0000",
        b"\0" * 32,  # uname
        b"\0" * 32,  # gname
        _octal(0, 8),  # devmajor
        _octal(0, 8),  # devminor
        b"\0" * 155,  # prefix (unused: long paths go in a PAX header)
    ]
    block = b"".join(fields).ljust(BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(block)
    return block[:148] + checksum + block[156:]


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _fits(value: bytes) -> bool:
    return len(value) <= 100 and value.isascii()


def _member(m: Member) -> bytes:
    name = m.name.encode("utf-8") + (b"/" if m.directory and not m.name.endswith("/") else b"")
    target = m.data if m.symlink else b""
    size = len(m.data) if not (m.symlink or m.directory) else 0
    pax = b""
    if not _fits(name):
        pax += _pax_record("path", name)
    if m.symlink and not _fits(target):
        pax += _pax_record("linkpath", target)
    if size >= 8**11:
        pax += _pax_record("size", str(size).encode())
    out = []
    if pax:
        out.append(_header(_PAX_NAME, mode=0o644, size=len(pax), typeflag=b"x") + _pad(pax))
        name = name[:100] if name.isascii() else b"@LongName"
        target = target[:100] if target.isascii() else b"@LongLink"
    typeflag = b"5" if m.directory else b"2" if m.symlink else b"0"
    out.append(
        _header(name, mode=m.mode, size=size if size < 8**11 else 0, typeflag=typeflag, linkname=target)
    )
    if size:
        out.append(_pad(m.data))
    return b"".join(out)


def write_tar(fileobj: BinaryIO, members: Iterable[Member]) -> None:
    """Write ``members`` in the order given, then the two zero blocks that end a tar."""
    for m in members:
        fileobj.write(_member(m))
    fileobj.write(b"\0" * (2 * BLOCK))


def tar_bytes(members: Iterable[Member]) -> bytes:
    """``write_tar`` into memory."""
    return b"".join(_member(m) for m in members) + b"\0" * (2 * BLOCK)


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
