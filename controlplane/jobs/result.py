"""The result a job guest's init wrote to the ``avm.result`` port: rc, stdout, stderr, outputs.

The port carries exactly one frame: ``AVM-RESULT-1 <secret>\\n``, one tar, ``AVM-RESULT-END
<secret>\\n``. The secret is made per run by the host and only the (root) init can read it; it
is removed before the job starts. Anything else on the port (no frame, a wrong secret, a second
archive, unexpected members, data after the archive) is refused. The result is read from the
file QEMU wrote, in bounded pieces: outputs are streamed to disk, never held in memory. Outputs
are extracted only as regular files and directories under the listed output paths, inside the
job's output directory: links, devices, absolute or ``..`` paths are refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from controlplane.errors import OperationalError, RefusedError
from controlplane.jobs.oci.layers import member_path

HEADER = b"AVM-RESULT-1 "
TRAILER = b"AVM-RESULT-END "
SMALL = {"rc": 32, "stdout.rest": 32, "stderr.rest": 32, "netdevs": 4096, "mounts": 4096}
SMALL_MAX = 1 << 20  # probes.txt, truncated
MAX_PADDING = 64 << 10  # tar end-of-archive blocks and record padding
# What a result proves and what it does not: stated in every job receipt (docs/jobs.md too).
NON_CLAIMS = (
    "the result (exit code, stdout, stderr, outputs) is what avm's init observed inside the guest and "
    "framed with this run's secret; it proves what the job printed, wrote and exited with, not that "
    "any of it is correct, and not what the job did inside the guest meanwhile",
    "the guest kernel and avm's init are trusted: a job that subverts the guest kernel could forge the "
    "result; the host checks the frame, not the guest's integrity",
)


@dataclasses.dataclass(frozen=True)
class GuestResult:
    rc: int
    stdout: str
    stderr: str
    archive: Path  # the result file; the tar starts at ``offset``
    offset: int
    truncated: list[dict[str, Any]]  # one entry per cut stream or output: name, limit, bytes_seen
    netdevs: list[str]
    root_mount: str
    probes: str = ""
    output_members: int = 0


def _no_result(path: Path, size: int, why: str) -> OperationalError:
    return OperationalError(
        "job-no-result",
        f"the guest wrote no complete result ({size} bytes on the result port): {why}",
        hint="see the console log of the run; the guest kernel or init failed",
    )


def _refuse(code: str, message: str, **details: Any) -> RefusedError:
    return RefusedError(
        code,
        message,
        hint="only the result the avm init frames for this run is accepted; the job tried to write its own",
        details=details,
    )


def parse(path: Path, secret: str, stdio_limit: int, output_limit: int) -> GuestResult:
    """Check the frame and read the small members. Raises ``OperationalError('job-no-result')``
    when the port holds nothing complete, and ``RefusedError`` ``job-result-unframed`` (not this
    run's frame), ``job-result-unexpected`` (a member init does not write, or one twice),
    ``job-result-extra-data`` (anything after the one archive)."""
    size = path.stat().st_size
    head, tail = HEADER + secret.encode() + b"\n", TRAILER + secret.encode() + b"\n"
    if size == 0:
        raise _no_result(path, size, "the port is empty")
    with open(path, "rb") as fh:
        first = fh.read(len(head))
        if first != head:
            raise _refuse("job-result-unframed", "the result port does not start with this run's frame")
        if size < len(head) + len(tail):
            raise _no_result(path, size, "the frame is incomplete")
        fh.seek(size - len(tail))
        if fh.read(len(tail)) != tail:
            raise _no_result(path, size, "the frame has no end marker (the guest stopped while writing)")
        fh.seek(len(head))
        files: dict[str, bytes] = {}
        sizes: dict[str, int] = {}
        outputs = 0
        try:
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                for m in tar:
                    name = str(member_path(m.name))
                    top = name.split("/", 1)[0]
                    if name in sizes or top not in {
                        *SMALL,
                        "stdout",
                        "stderr",
                        "probes.txt",
                        "truncated",
                        "out",
                    }:
                        raise _refuse("job-result-unexpected", f"result member {m.name!r} is unexpected")
                    sizes[name] = m.size
                    if top == "out":
                        outputs += 1
                        continue
                    cap = SMALL.get(name, stdio_limit if name in ("stdout", "stderr") else SMALL_MAX)
                    if m.size > cap or not m.isfile():
                        raise _refuse(
                            "job-result-unexpected", f"result member {name} ({m.size} B) over {cap} B"
                        )
                    src = tar.extractfile(m)
                    files[name] = src.read() if src is not None else b""
                end = len(head) + tar.offset
        except tarfile.TarError as exc:
            raise _no_result(path, size, f"the archive is unreadable: {exc}") from None
        fh.seek(end)
        rest = size - len(tail) - end
        padding = fh.read(min(max(rest, 0), MAX_PADDING + 1))
        if rest > MAX_PADDING or padding.strip(b"\0"):
            raise _refuse("job-result-extra-data", f"{rest} bytes after the result archive", bytes=rest)
    try:
        rc = int(files["rc"].decode().strip())
    except (KeyError, ValueError):
        raise _no_result(path, size, "no exit code in the archive") from None
    return GuestResult(
        rc=rc,
        stdout=files.get("stdout", b"").decode("utf-8", "replace"),
        stderr=files.get("stderr", b"").decode("utf-8", "replace"),
        archive=path,
        offset=len(head),
        truncated=_truncations(files, stdio_limit, output_limit),
        netdevs=files.get("netdevs", b"").decode("utf-8", "replace").split(),
        root_mount=files.get("mounts", b"").decode("utf-8", "replace").strip(),
        probes=files.get("probes.txt", b"").decode("utf-8", "replace"),
        output_members=outputs,
    )


def _truncations(files: dict[str, bytes], stdio_limit: int, output_limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in ("stdout", "stderr"):
        rest = int((files.get(f"{name}.rest") or b"0").decode().strip() or 0)
        if rest > 0:
            seen = len(files.get(name, b"")) + rest
            out.append({"name": name, "truncated": True, "limit": stdio_limit, "bytes_seen": seen})
    for line in files.get("truncated", b"").decode("utf-8", "replace").splitlines():
        count, _, rel = line.partition(" ")
        if count.isdigit() and rel:
            out.append(
                {"name": f"output:{rel}", "truncated": True, "limit": output_limit, "bytes_seen": int(count)}
            )
    return out


def _allowed(rel: PurePosixPath, outputs: Sequence[str]) -> bool:
    return any(rel == PurePosixPath(o) or PurePosixPath(o) in rel.parents for o in outputs)


def extract_outputs(result: GuestResult, outputs: Sequence[str], dest: Path, limit: int) -> list[str]:
    """Stream the listed outputs into ``dest`` (an existing directory the runner made or claimed
    empty). Every member is checked before the first byte is written. Returns the files written.
    Raises ``RefusedError('job-output-unsafe')`` for a member that is a link, a device or escapes,
    ``RefusedError('job-output-over-limit')`` beyond ``limit`` bytes in all."""
    if not result.output_members:
        return []
    root = os.path.realpath(dest)
    with open(result.archive, "rb") as fh:
        fh.seek(result.offset)
        with tarfile.open(fileobj=fh, mode="r:") as tar:
            members = [m for m in tar if str(member_path(m.name)).startswith("out/")]
            total = 0
            for m in members:
                rel = PurePosixPath(str(member_path(m.name))[4:])
                bad = rel.is_absolute() or ".." in rel.parts or not (m.isfile() or m.isdir())
                if bad or not _allowed(rel, outputs):
                    raise RefusedError(
                        "job-output-unsafe",
                        f"job output member {m.name!r} ({'link' if m.issym() or m.islnk() else m.type!r}) "
                        "is not a plain file or directory under a listed output",
                        hint="outputs are copied out only as regular files inside the output directory",
                        details={"member": m.name, "outputs": list(outputs)},
                    )
                total += m.size if m.isfile() else 0
            if total > limit:
                raise RefusedError(
                    "job-output-over-limit",
                    f"outputs hold {total} bytes, expected at most {limit}",
                    hint="raise limits.output_bytes in the job spec",
                    details={"expected": limit, "actual": total},
                )
            return _write_members(tar, members, root)


def _write_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], root: str) -> list[str]:
    written: list[str] = []
    for m in members:
        rel = PurePosixPath(str(member_path(m.name))[4:])
        if rel == PurePosixPath("."):
            continue
        target = Path(root, *rel.parts)
        if not os.path.realpath(target.parent).startswith(root):
            raise RefusedError("job-output-unsafe", f"job output {m.name!r} escapes {root}")
        if m.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(m)
        assert src is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        written.append(str(rel))
    return written
