"""The release bundle: a deterministic tar of one exact commit, built from git objects.

The same commit always gives the same bytes, on any machine and any Python version: the tar is
written by ``_internal.archive`` (USTAR, mtime 0, root, a PAX header only where needed), with
paths sorted by their UTF-8 bytes, mode 0644 or 0755 from the git mode, symlinks as symlinks and
no directory entries. The work tree, its
index, ``.gitattributes`` filters and line-ending conversion play no part: blobs come straight
from ``git cat-file --batch``.

Submodules are refused: their content is not in the commit, so a bundle could not be exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path, PurePosixPath

from controlplane._internal.archive import Member, tar_bytes
from controlplane.errors import OperationalError, RefusedError
from controlplane.ids import CommitSha, Digest
from controlplane.release import git


@dataclasses.dataclass(frozen=True)
class Bundle:
    sha: CommitSha
    data: bytes
    digest: Digest  # "sha256:<hex>" of data
    files: dict[str, str]  # relative path -> "sha256:<hex>" of the file content (regular files only)
    symlinks: dict[str, str] = dataclasses.field(default_factory=dict)  # relative path -> target
    executables: frozenset[str] = frozenset()  # regular files the commit marks 100755


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
    members: list[Member] = []
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
        members.append(Member(entry.path, content, 0o777 if symlink else mode, symlink=symlink))
        if symlink:
            symlinks[entry.path] = content.decode("utf-8", "surrogateescape")
        else:
            files[entry.path] = "sha256:" + hashlib.sha256(content).hexdigest()
    data = tar_bytes(members)
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
