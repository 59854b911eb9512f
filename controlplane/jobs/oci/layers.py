"""Unpack an image's layers, in order and honouring OCI whiteouts, into a guest root directory.

Whiteouts: ``.wh.NAME`` deletes NAME from the lower layers; ``.wh..wh..opq`` empties its directory
of everything the lower layers put there. No member may escape the root: absolute paths, ``..``
and writes through a symlink that leaves the root are refused; device nodes are skipped (the
guest makes its own /dev).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from controlplane.errors import RefusedError
from controlplane.jobs.oci.store import LAYER_GZ, LAYER_TAR, StoredImage, read_blob

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def _escape(member: str, why: str) -> RefusedError:
    return RefusedError(
        "image-layer-unsafe",
        f"layer member {member!r} {why}",
        hint="the image is malformed or hostile; rebuild it from trusted files",
        details={"member": member},
    )


def _inside(root: Path, rel: PurePosixPath, member: str) -> Path:
    if rel.is_absolute() or ".." in rel.parts:
        raise _escape(member, "leaves the image root")
    target = root.joinpath(*rel.parts) if rel.parts else root
    parent = os.path.realpath(target.parent)
    if parent != str(root) and not parent.startswith(str(root) + os.sep):
        raise _escape(member, "is written through a symlink that leaves the image root")
    return target


def member_path(name: str) -> PurePosixPath:
    """A tar member name as a relative path: only a leading ``./`` is dropped (``/x`` stays absolute)."""
    while name.startswith("./"):
        name = name[2:]
    return PurePosixPath(name.rstrip("/") or ".")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def unpack(store: Path, image: StoredImage, root: Path) -> int:
    """Unpack all layers of ``image`` into ``root`` (created, must be empty). Returns the number of
    members written. Raises ``RefusedError('image-layer-unsafe' | 'image-layer-unsupported')``
    and what ``read_blob`` raises."""
    root.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(root))
    written = 0
    for layer in image.layers:
        data = read_blob(store, layer["digest"])
        media = layer.get("mediaType", "")
        if media in (LAYER_GZ, "application/vnd.docker.image.rootfs.diff.tar.gzip"):
            data = gzip.decompress(data)
        elif media != LAYER_TAR:
            raise RefusedError("image-layer-unsupported", f"layer media type {media!r} is not supported")
        written += _apply_layer(data, root)
    return written


def _apply_layer(data: bytes, root: Path) -> int:
    written = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        # whiteouts of a layer apply to the lower layers only: do them first
        for m in members:
            rel = member_path(m.name)
            base = rel.name
            if base == OPAQUE:
                directory = _inside(root, rel.parent, m.name)
                if directory.is_dir() and not directory.is_symlink():
                    for child in directory.iterdir():
                        _remove(child)
            elif base.startswith(WHITEOUT):
                _remove(_inside(root, rel.parent / base[len(WHITEOUT) :], m.name))
        for m in members:
            rel = member_path(m.name)
            if rel.name.startswith(WHITEOUT) or rel == PurePosixPath("."):
                continue
            target = _inside(root, rel, m.name)
            if m.isdir():
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    _remove(target)
                target.mkdir(parents=True, exist_ok=True)
                os.chmod(target, m.mode & 0o7777)
                continue
            if m.isdev() or m.isfifo():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                _remove(target)
            if m.issym():
                os.symlink(m.linkname, target)
            elif m.islnk():
                source = _inside(root, member_path(m.linkname), m.name)
                if not source.is_file() or source.is_symlink():
                    raise _escape(m.name, f"hard-links to {m.linkname!r}, which is not a regular file here")
                shutil.copy2(source, target)
            else:
                src = tar.extractfile(m)
                assert src is not None  # a regular file always has content
                with open(target, "wb") as fh:
                    shutil.copyfileobj(src, fh)
                os.chmod(target, m.mode & 0o7777)
            written += 1
    return written
