"""The release bundle: a deterministic tar of one exact commit, built from git objects.

The same commit always gives the same bytes, on any machine and any Python version, because the
tar headers are written here rather than by ``tarfile``: USTAR, paths sorted by their UTF-8
bytes, mtime 0, uid/gid 0, empty uname/gname, mode 0644 or 0755 from the git mode, symlinks as
symlinks, no directory entries, and a PAX ``x`` header only where USTAR cannot hold a value (a
path or link target over 100 bytes or not ASCII, a file of 8 GiB or more). The work tree, its
index, ``.gitattributes`` filters and line-ending conversion play no part: blobs come straight
from ``git cat-file --batch``.

Submodules are refused: their content is not in the commit, so a bundle could not be exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path, PurePosixPath

from controlplane.errors import OperationalError, RefusedError
from controlplane.ids import CommitSha, Digest
from controlplane.release import git

BLOCK = 512
_PAX_NAME = b"././@PaxHeader"


@dataclasses.dataclass(frozen=True)
class Bundle:
    sha: CommitSha
    data: bytes
    digest: Digest  # "sha256:<hex>" of data
    files: dict[str, str]  # relative path -> "sha256:<hex>" of the file content (regular files only)
    symlinks: dict[str, str] = dataclasses.field(default_factory=dict)  # relative path -> target
    executables: frozenset[str] = frozenset()  # regular files the commit marks 100755


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


def _member(path: str, *, mode: int, content: bytes, symlink: bool) -> bytes:
    name = path.encode("utf-8")
    target = content if symlink else b""
    size = 0 if symlink else len(content)
    pax = b""
    if not _fits(name):
        pax += _pax_record("path", name)
    if symlink and not _fits(target):
        pax += _pax_record("linkpath", target)
    if size >= 8**11:
        pax += _pax_record("size", str(size).encode())
    out = []
    if pax:
        out.append(_header(_PAX_NAME, mode=0o644, size=len(pax), typeflag=b"x") + _pad(pax))
        name = name[:100] if name.isascii() else b"@LongName"
        target = target[:100] if target.isascii() else b"@LongLink"
    out.append(
        _header(
            name,
            mode=mode,
            size=size if size < 8**11 else 0,
            typeflag=b"2" if symlink else b"0",
            linkname=target,
        )
    )
    if not symlink:
        out.append(_pad(content))
    return b"".join(out)


def build(repo: Path, sha: str) -> Bundle:
    """The bundle of commit ``sha`` of ``repo``.

    Raises ``RefusedError('submodule-unsupported')`` if the commit has submodules, plus what
    ``git.tree`` raises (``ref-unknown``, ``repo-not-found``, ``path-not-utf8``).
    """
    entries = git.tree(repo, sha)
    submodules = [e.path for e in entries if e.kind == "submodule"]
    if submodules:
        raise RefusedError(
            "submodule-unsupported",
            f"commit {sha[:12]} has submodules, which a release bundle cannot contain exactly: "
            + ", ".join(submodules[:5]),
            hint="vendor the submodule's files into the repository, or pin them as artifacts",
            details={"submodules": submodules},
        )
    entries.sort(key=lambda e: e.path.encode("utf-8"))
    blobs = git.cat_blobs(repo, [e.sha for e in entries])
    out = io.BytesIO()
    files: dict[str, str] = {}
    symlinks: dict[str, str] = {}
    for entry, blob in zip(entries, blobs, strict=True):
        if blob is None or blob[0] != "blob":
            raise OperationalError(
                "git-object-missing",
                f"object {entry.sha} ({entry.path}) of commit {sha[:12]} is missing from {repo}",
                hint="the repository is incomplete (shallow or partial clone); fetch it fully",
                details={"path": entry.path, "object": entry.sha},
            )
        content = blob[1]
        symlink = entry.kind == "symlink"
        mode = 0o755 if entry.mode == "100755" else 0o644
        out.write(_member(entry.path, mode=0o777 if symlink else mode, content=content, symlink=symlink))
        if symlink:
            symlinks[entry.path] = content.decode("utf-8", "surrogateescape")
        else:
            files[entry.path] = "sha256:" + hashlib.sha256(content).hexdigest()
    out.write(b"\0" * (2 * BLOCK))
    data = out.getvalue()
    return Bundle(
        sha=sha,
        data=data,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        files=files,
        symlinks=symlinks,
        executables=frozenset(e.path for e in entries if e.mode == "100755"),
    )


def _invalid(message: str) -> RefusedError:
    return RefusedError(
        "bundle-invalid",
        message,
        hint="the bundle was not produced by `avm sign --bundle-out`, or it was altered",
    )


def unpack_listing(data: bytes) -> dict[str, str]:
    """Recompute ``Bundle.files`` from a bundle's bytes (regular files only; symlinks are listed
    by neither side).

    Raises ``RefusedError('bundle-invalid')`` for bytes that are not a tar, or a member that is
    not a regular file or symlink, or a path that is absolute or climbs out with ``..``.
    """
    import tarfile

    files: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if member.name.startswith("/") or ".." in parts or not parts:
                    raise _invalid(f"bundle member has an unsafe path: {member.name!r}")
                if member.issym():
                    continue
                if not member.isfile():
                    raise _invalid(f"bundle member {member.name!r} is not a regular file or symlink")
                handle = tar.extractfile(member)
                if handle is None:
                    raise _invalid(f"bundle member {member.name!r} has no content")
                digest = hashlib.sha256()
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                files[member.name] = "sha256:" + digest.hexdigest()
    except tarfile.TarError as exc:
        raise _invalid(f"bundle is not a readable tar: {exc}") from exc
    return files
