"""The external tools of the image build, each wrapped once: argv only, a deadline, classified errors.

``run`` starts every tool in its own process group and kills the whole group at the deadline,
so a timed-out ``mmdebstrap`` takes its apt and dpkg children with it. ``mmdebstrap`` runs in a
private mount namespace (``unshare --mount``): the /proc, /sys and /dev it mounts into the
chroot for its hooks vanish with the namespace even if it is killed, so a failed build never
leaves a host mount under the build directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from controlplane.errors import CommandFailed, CommandTimeout, OperationalError
from controlplane.transport.base import RunResult

MMDEBSTRAP_TIMEOUT_S = 1200.0
MKFS_TIMEOUT_S = 300.0
QEMU_IMG_TIMEOUT_S = 300.0
QUERY_TIMEOUT_S = 60.0
CHROOT_TIMEOUT_S = 120.0

_PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "unshare": "util-linux",
    "mkfs.ext4": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "dpkg-query": "dpkg",
    "chroot": "coreutils",
}


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    hint: str = "",
) -> RunResult:
    """Run ``argv`` (no shell), wait at most ``timeout`` seconds, and return its result.

    Raises ``OperationalError('tool-missing')`` when the program is not installed,
    ``CommandTimeout`` when the deadline passes (its whole process group is killed), and
    ``CommandFailed`` (rc, stdout, stderr kept) when it exits non-zero.
    """
    args = [str(a) for a in argv]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError as exc:
        package = _PACKAGES.get(Path(args[0]).name, args[0])
        raise OperationalError(
            "tool-missing",
            f"`{args[0]}` is not installed or not on PATH",
            hint=f"install the Debian package {package} (`make setup` does it as root)",
            details={"argv": args},
        ) from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # the deadline, or Ctrl-C: never leave the tool running
        _kill_group(proc)
        out, err = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise CommandTimeout(args, timeout, _text(out), _text(err)) from None
        raise
    result = RunResult(
        argv=args,
        rc=proc.returncode,
        stdout=_text(out),
        stderr=_text(err),
        duration_s=time.monotonic() - start,
    )
    if result.rc != 0:
        raise CommandFailed(args, result.rc, result.stdout, result.stderr, hint=hint)
    return result


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _text(data: bytes | None) -> str:
    return data.decode("utf-8", "replace") if data else ""


def mmdebstrap_argv(
    *,
    suite: str,
    target: Path,
    mirrors: Sequence[str],
    variant: str,
    architecture: str,
    components: Sequence[str],
    packages: Sequence[str],
    dpkg_options: Sequence[str],
    customize_hooks: Sequence[Path],
    setup_hooks: Sequence[str] = (),
) -> list[str]:
    """The argv of one mmdebstrap run (root mode, to a directory), inside a private mount namespace.

    Each hook is an executable file: mmdebstrap execs it directly with the chroot directory as
    its only argument, without a shell (``man mmdebstrap``, HOOKS).
    """
    return [
        "unshare",
        "--mount",
        "--propagation=private",
        "--",
        "mmdebstrap",
        "--mode=root",
        f"--variant={variant}",
        f"--architectures={architecture}",
        f"--components={','.join(components)}",
        f"--include={','.join(packages)}",
        *(f"--dpkgopt={opt}" for opt in dpkg_options),
        *(f"--setup-hook={hook}" for hook in setup_hooks),
        *(f"--customize-hook={hook}" for hook in customize_hooks),
        "--",
        suite,
        str(target),
        *mirrors,
    ]


def mmdebstrap(argv: Sequence[str], env: Mapping[str, str]) -> RunResult:
    return run(
        argv,
        timeout=MMDEBSTRAP_TIMEOUT_S,
        env=env,
        hint="check that deb.debian.org is reachable and the disk has ~2 GB free; the log tail is above",
    )


def mkfs_ext4(
    rootfs: Path, raw: Path, *, label: str, size_mib: int, fs_uuid: str, hash_seed: str, epoch: int
) -> RunResult:
    """Create an ext4 file system image ``raw`` of ``size_mib`` from the ``rootfs`` directory,
    with a fixed UUID and directory hash seed, and ``epoch`` as its clock (superblock, new inodes)."""
    return run(
        [
            *("mkfs.ext4", "-q", "-F", "-L", label, "-U", fs_uuid, "-E", f"hash_seed={hash_seed}"),
            *("-d", str(rootfs), str(raw), f"{size_mib}M"),
        ],
        timeout=MKFS_TIMEOUT_S,
        env=_fake_time(epoch),
        hint="if it says it could not allocate blocks, raise disk.size_mib in the recipe",
    )


def _fake_time(epoch: int) -> dict[str, str]:
    return {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch)}


def dumpe2fs(raw: Path, epoch: int) -> RunResult:
    return run(["dumpe2fs", str(raw)], timeout=QUERY_TIMEOUT_S, env=_fake_time(epoch))


def dumpe2fs_header(raw: Path, epoch: int) -> RunResult:
    return run(["dumpe2fs", "-h", str(raw)], timeout=QUERY_TIMEOUT_S, env=_fake_time(epoch))


def debugfs_script(raw: Path, script: Path, epoch: int) -> RunResult:
    """Run a debugfs command file read-write on ``raw``, with ``epoch`` as its clock."""
    return run(["debugfs", "-w", "-f", str(script), str(raw)], timeout=MKFS_TIMEOUT_S, env=_fake_time(epoch))


def qemu_img_convert(raw: Path, qcow2: Path) -> RunResult:
    return run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        timeout=QEMU_IMG_TIMEOUT_S,
    )


def dpkg_query(rootfs: Path) -> RunResult:
    """The installed packages of the image, one ``name\\tversion\\tarch`` line each."""
    return run(
        [
            "dpkg-query",
            "-W",
            f"--admindir={rootfs / 'var/lib/dpkg'}",
            "-f",
            "${Package}\\t${Version}\\t${Architecture}\\n",
        ],
        timeout=QUERY_TIMEOUT_S,
    )


def chroot(rootfs: Path, argv: Sequence[str]) -> RunResult:
    """Run a program of the image inside it (used only from the customize hook)."""
    return run(["chroot", str(rootfs), *argv], timeout=CHROOT_TIMEOUT_S)


def tool_version(argv: Sequence[str]) -> str:
    """The first line a tool prints for its version, or ``unknown`` (recorded, never decisive)."""
    try:
        res = run(argv, timeout=QUERY_TIMEOUT_S)
    except OperationalError:
        return "unknown"
    line = (res.stdout or res.stderr).strip().splitlines()
    return line[0] if line else "unknown"
