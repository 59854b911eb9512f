"""The result a job guest's init wrote to the ``avm.result`` port: rc, stdout, stderr, outputs.

The bytes are a tar written by the (root) init after the job exited; nothing here reads the
console. Outputs are extracted only as regular files and directories under the listed output
paths, inside the job's output directory: links, devices, absolute or ``..`` paths are refused.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from controlplane.errors import OperationalError, RefusedError
from controlplane.ocilayers import member_path

MAX_TEXT = 1 << 20


@dataclasses.dataclass(frozen=True)
class GuestResult:
    rc: int
    stdout: str
    stderr: str
    out_tar: bytes
    probes: str = ""


def parse(data: bytes) -> GuestResult:
    """Raises ``OperationalError('job-no-result')`` when the channel holds no complete result
    (the guest died before its init wrote one)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            files = {}
            for m in tar.getmembers():
                f = tar.extractfile(m) if m.isfile() else None
                if f is not None:
                    files[str(member_path(m.name))] = f.read()
        rc = int(files["rc"].decode().strip())
    except (tarfile.TarError, KeyError, ValueError, EOFError) as exc:
        raise OperationalError(
            "job-no-result",
            f"the guest wrote no complete result ({len(data)} bytes on the result port): {exc}",
            hint="see the console log in the job directory; the guest kernel or init failed",
        ) from None
    return GuestResult(
        rc=rc,
        stdout=files.get("stdout", b"")[:MAX_TEXT].decode("utf-8", "replace"),
        stderr=files.get("stderr", b"")[:MAX_TEXT].decode("utf-8", "replace"),
        out_tar=files.get("out.tar", b""),
        probes=files.get("probes.txt", b"")[:MAX_TEXT].decode("utf-8", "replace"),
    )


def _allowed(rel: PurePosixPath, outputs: Sequence[str]) -> bool:
    return any(rel == PurePosixPath(o) or PurePosixPath(o) in rel.parents for o in outputs)


def extract_outputs(out_tar: bytes, outputs: Sequence[str], dest: Path) -> list[str]:
    """Copy the listed outputs into ``dest``. Returns the files written. Raises
    ``RefusedError('job-output-unsafe')`` for a member that is a link, a device or escapes."""
    written: list[str] = []
    if not out_tar:
        return written
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    with tarfile.open(fileobj=io.BytesIO(out_tar), mode="r:") as tar:
        for m in tar.getmembers():
            rel = member_path(m.name)
            bad = (
                rel.is_absolute()
                or ".." in rel.parts
                or not (m.isfile() or m.isdir())
                or not _allowed(rel, outputs)
            )
            if bad:
                raise RefusedError(
                    "job-output-unsafe",
                    f"job output member {m.name!r} ({'link' if m.issym() or m.islnk() else m.type!r}) "
                    "is not a plain file or directory under a listed output",
                    hint="outputs are copied out only as regular files inside the output directory",
                    details={"member": m.name, "outputs": list(outputs)},
                )
            target = Path(root, *rel.parts)
            if not os.path.realpath(target.parent).startswith(root):
                raise RefusedError("job-output-unsafe", f"job output {m.name!r} escapes {dest}")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            target.write_bytes(src.read())
            os.chmod(target, 0o644)
            written.append(str(rel))
    return written
