"""The one tar writer (_internal.archive): what tarfile reads back is exactly what was written."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from controlplane._internal.archive import BLOCK, Member, tar_bytes, write_cpio, write_tar

LONG = "d/" + "x" * 120 + "/é.txt"  # over 100 bytes and not ASCII: needs a PAX path record


def test_files_dirs_symlinks_and_long_names_round_trip_through_tarfile() -> None:
    members = [
        Member("d", mode=0o755, directory=True),
        Member("d/run.sh", b"#!/bin/sh\n", 0o755),
        Member(LONG, b"long\n"),
        Member("d/link", b"run.sh", 0o777, symlink=True),
        Member("d/far", ("../" * 40 + "t").encode(), 0o777, symlink=True),  # PAX linkpath
    ]
    data = tar_bytes(members)
    assert len(data) % BLOCK == 0 and data.endswith(b"\0" * (2 * BLOCK))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        got = [(m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.uname, m.linkname) for m in tar]
        assert tar.extractfile(LONG).read() == b"long\n"  # type: ignore[union-attr]
    assert got == [
        ("d", tarfile.DIRTYPE, 0o755, 0, 0, 0, "", ""),
        ("d/run.sh", tarfile.REGTYPE, 0o755, 0, 0, 0, "", ""),
        (LONG, tarfile.REGTYPE, 0o644, 0, 0, 0, "", ""),
        ("d/link", tarfile.SYMTYPE, 0o777, 0, 0, 0, "", "run.sh"),
        ("d/far", tarfile.SYMTYPE, 0o777, 0, 0, 0, "", "../" * 40 + "t"),
    ]


def test_the_same_members_give_the_same_bytes_streamed_or_in_memory() -> None:
    members = [Member("a", b"1"), Member("b/c", b"2" * 700, 0o600)]
    buf = io.BytesIO()
    write_tar(buf, members)
    assert buf.getvalue() == tar_bytes(members) == tar_bytes(list(members))


def test_cpio_is_sorted_root_owned_and_strips_set_id_bits(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "su").write_bytes(b"x")
    os.chmod(root / "bin" / "su", 0o4755)  # noqa: S103 - the set-uid bit the writer must strip
    (root / "init").write_bytes(b"#!/bin/sh\n")
    os.symlink("bin/su", root / "link")
    stripped: list[str] = []
    size = write_cpio(root, tmp_path / "out.cpio", stripped)
    raw = (tmp_path / "out.cpio").read_bytes()
    assert size == len(raw) and stripped == ["bin/su"]
    names, modes, offset = [], {}, 0
    while True:
        fields = [int(raw[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize, mode, uid = fields[11], fields[6], fields[1], fields[2]
        start = offset + 110
        name = raw[start : start + namesize - 1].decode()
        if name == "TRAILER!!!":
            break
        names.append(name)
        modes[name] = (mode, uid)
        offset = start + namesize
        offset += -offset % 4
        offset += filesize + (-filesize % 4)
    assert names == ["bin", "init", "link", "bin/su"]
    assert modes["bin/su"] == (0o100755, 0)
