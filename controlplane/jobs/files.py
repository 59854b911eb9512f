"""The host files of one job run: confined inputs, the output directory it claims, its console log.

* Inputs: ``inputs[].src`` is relative to the spec's directory and must still be inside it after
  every symlink is resolved; it must be a regular file (no device, FIFO or directory), may not
  lie inside the avm home (keys, receipts), and is read with the rights of the invoking user
  (``SUDO_UID``/``SUDO_GID`` when avm runs under sudo), never with root's.
* Output directory: the runner writes only into a directory it created, or one that was empty
  and that it claimed with an exclusive marker file; it never deletes anything it did not create.
* Console log: one file per run (``<home>/job-logs/<id>+<nonce>.console.log``, at most
  ``CONSOLE_LOG_MAX`` bytes); the newest ``KEEP_LOGS`` runs of a job id are kept, older ones removed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

from controlplane.errors import RefusedError, UsageError
from controlplane.evidence.step import Check
from controlplane.home import Home
from controlplane.jobs.runtime import CONSOLE_LOG_MAX

KEEP_LOGS = 5
MARKER = ".avm-run"


def invoking_user() -> tuple[int, int]:
    """(uid, gid) whose rights inputs are read with: the sudo caller's, else the real ids."""
    if os.geteuid() == 0 and os.environ.get("SUDO_UID", "").isdigit():
        return int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", "65534") or 65534)
    return os.getuid(), os.getgid()


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def confine_inputs(inputs: Sequence[tuple[str, str]], spec_dir: Path, home: Home) -> dict[str, Path]:
    """``(src, dest)`` pairs -> ``dest -> resolved source``, checked before anything is created.

    Raises ``UsageError('job-input-missing')`` and ``RefusedError`` with ``job-input-outside``
    (resolves outside the spec's directory), ``job-input-in-avm-home``, ``job-input-not-regular``."""
    base = os.path.realpath(spec_dir)
    avm_home = os.path.realpath(home.root)
    found: dict[str, Path] = {}
    for src, dest in inputs:
        real = os.path.realpath(os.path.join(base, src))
        if not _inside(real, base):
            raise RefusedError(
                "job-input-outside",
                f"input {src!r} resolves to {real}, outside the spec's directory {base}",
                hint="inputs are files next to the spec; copy the file there (links out are refused)",
                details={"expected": f"inside {base}", "actual": real},
            )
        if _inside(real, avm_home):
            raise RefusedError(
                "job-input-in-avm-home",
                f"input {src!r} is inside the avm home {avm_home} (keys, receipts)",
                hint="never hand avm's own files to a job",
                details={"actual": real},
            )
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise UsageError(
                "job-input-missing", f"input {src!r} ({real}) does not exist", hint="fix inputs[].src"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise RefusedError(
                "job-input-not-regular",
                f"input {src!r} ({real}) is not a regular file (mode {stat.filemode(st.st_mode)})",
                hint="inputs must be regular files: no device, FIFO, socket or directory",
                details={"expected": "regular file", "actual": stat.filemode(st.st_mode)},
            )
        found[dest] = Path(real)
    return found


def copy_inputs(found: dict[str, Path], staging: Path) -> dict[str, Path]:
    """Copy each input into ``staging`` with the invoking user's rights. Returns ``dest -> copy``.

    Raises ``RefusedError('job-input-unreadable')`` when that user may not read it."""
    uid, gid = invoking_user()
    staging.mkdir(mode=0o700, exist_ok=True)
    out: dict[str, Path] = {}
    for i, (dest, real) in enumerate(sorted(found.items())):
        copy = staging / f"{i}.in"
        with open(copy, "wb") as fh:
            if (uid, gid) == (os.geteuid(), os.getegid()):
                err = _copy_self(real, fh)
            else:  # a separate process with the user's ids: root's rights never touch the file
                argv = ["cat", "--", str(real)]
                proc = subprocess.run(argv, stdout=fh, stderr=subprocess.PIPE, user=uid, group=gid,
                                      extra_groups=[], timeout=120, check=False)  # fmt: skip
                err = proc.stderr.decode(errors="replace").strip() if proc.returncode else ""
        if err:
            raise RefusedError(
                "job-input-unreadable",
                f"input {real} cannot be read by uid {uid} (the invoking user): {err}",
                hint="inputs are read with your rights, not avm's",
                details={"uid": uid, "path": str(real)},
            )
        out[dest] = copy
    return out


def _copy_self(real: Path, fh: object) -> str:
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return exc.strerror or str(exc)
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        shutil.copyfileobj(src, fh, 1 << 20)  # type: ignore[arg-type]
    return ""


@dataclasses.dataclass
class OutDir:
    """An output directory this run owns: it ``created`` it, or claimed it empty with ``marker``."""

    path: Path
    created: bool
    marker: Path

    def release(self, *, keep: bool) -> None:
        """Drop the claim; a directory this run created and left empty goes too unless ``keep``."""
        self.marker.unlink(missing_ok=True)
        if self.created and not keep and not any(self.path.iterdir()):
            self.path.rmdir()


def claim_out_dir(path: Path) -> OutDir:
    """Create ``path`` or claim it if it is an empty directory. Raises ``UsageError`` with
    ``job-out-invalid`` (not a directory, no parent) or ``job-out-not-empty`` (anything in it,
    including another run's claim)."""
    path = path.absolute()
    created = False
    try:
        path.mkdir(mode=0o755)
        created = True
    except FileNotFoundError:
        raise UsageError(
            "job-out-invalid", f"--out {path}: the parent directory does not exist", hint="create it first"
        ) from None
    except FileExistsError:
        if path.is_symlink() or not path.is_dir():
            raise UsageError("job-out-invalid", f"--out {path} exists and is not a directory") from None
    entries = sorted(p.name for p in path.iterdir())
    marker = path / MARKER
    try:
        if entries:
            raise FileExistsError
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        raise UsageError(
            "job-out-not-empty",
            f"--out {path} is not empty: expected an empty or new directory, found {entries[:5]}",
            hint="avm never writes into (or deletes) a directory it did not create; give a new path",
            details={"expected": [], "actual": entries[:20]},
        ) from None
    return OutDir(path=path, created=created, marker=marker)


def logs_dir(home: Home) -> Path:
    return home.root / "job-logs"


def keep_console_log(home: Home, job_id: str, run: str, src: Path | None) -> tuple[Path | None, list[Check]]:
    """Keep this run's console log (capped by the runtime) and prune the job id's older logs.

    Returns (kept path, checks); the check fails if a log is over the cap or too many are kept."""
    base = logs_dir(home)
    kept = None
    if src is not None and src.is_file():
        base.mkdir(mode=0o700, exist_ok=True)
        kept = base / f"{run}.console.log"
        shutil.copyfile(src, kept)
    mine = sorted(base.glob(f"{job_id}+*.console.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in mine[KEEP_LOGS:]:
        old.unlink(missing_ok=True)
    left = list(base.glob(f"{job_id}+*.console.log"))
    big = [p.name for p in left if p.stat().st_size > CONSOLE_LOG_MAX]
    ok = len(left) <= KEEP_LOGS and not big
    detail = f"{len(left)} log(s) of {job_id} kept (max {KEEP_LOGS}), each <= {CONSOLE_LOG_MAX} B"
    return kept, [Check("console-log-retained", ok, detail + (f"; over the cap: {big}" if big else ""))]
