"""Unpack a release tar write-once, run on the host as ``python3 -c <this file> TAR FINAL FILES``.

Into a temp dir ``FINAL.partial``; every file is verified against the signed file list
``FILES`` (JSON: relative path -> ``sha256:<hex>`` or ``symlink:<target>``), made read-only,
then the directory is renamed into place and the tar removed. An existing release is never
touched; an unsafe member or a content mismatch exits non-zero with the reason on stderr and
leaves no ``FINAL``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile


def extract(tar_path: str, tmp: str) -> None:
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir() or m.issym()):
                sys.exit("unsafe member: " + m.name)
            dest = os.path.join(tmp, m.name)
            if m.isdir():
                os.makedirs(dest, exist_ok=True)
            elif m.issym():
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.symlink(m.linkname, dest)
            else:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    sys.exit("unreadable member: " + m.name)
                with src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.chmod(dest, 0o555 if m.mode & 0o111 else 0o444)


def listing(tmp: str) -> dict[str, str]:
    """Relative path -> ``sha256:<hex>`` or ``symlink:<target>`` for every file and symlink."""
    got = {}
    for base, dirs, files in os.walk(tmp):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(base, d))]:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, tmp)
            if os.path.islink(full):
                got[rel] = "symlink:" + os.readlink(full)
            else:
                with open(full, "rb") as fh:
                    got[rel] = "sha256:" + hashlib.sha256(fh.read()).hexdigest()
    return got


def main() -> None:
    tar_path, final, want = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if os.path.exists(final):
        sys.exit("release exists: " + final)
    tmp = final + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    extract(tar_path, tmp)
    got = listing(tmp)
    if got != want:
        shutil.rmtree(tmp)
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        sys.exit("content differs from the signed file list: " + ", ".join(bad[:10]))
    for base, _dirs, _files in os.walk(tmp):
        os.chmod(base, 0o555)  # noqa: S103 - read-only for all: the service user reads it
    os.rename(tmp, final)
    os.unlink(tar_path)


if __name__ == "__main__":
    main()
