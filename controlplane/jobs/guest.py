"""The guest side of a Tier-2 job: a tiny busybox init, and the initramfs (newc cpio) that holds it.

The guest root is the unpacked image plus ``/.avm`` (a static busybox, kernel modules, this init
and the job's argv/env as a generated script). The init runs the job as uid 65534 with stdout
and stderr teed live to the console, then *itself* writes rc, stdout, stderr and the listed
outputs as a tar to the ``avm.result`` virtio-serial port. The port's device node is root-only
and the job is unprivileged, so the job can print anything but cannot forge the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane import guestscripts
from controlplane._internal.archive import write_cpio
from controlplane._internal.fs import write_atomic
from controlplane.errors import OperationalError

if TYPE_CHECKING:
    from controlplane.jobs.oci.store import StoredImage

JOB_UID = 65534
RESULT_PORT = "avm.result"
DEFAULT_PATH = "/bin:/usr/bin:/sbin:/usr/sbin"

INIT = guestscripts.text("job_init")

# Run as the job user after the job: cut output files so that all of them together stay within
# the budget; print "<bytes seen> <path>" for each file that was cut.
BUDGET = guestscripts.text("budget")


def job_script(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The job's argv and env as a script for the guest shell; every value is shell-quoted."""
    full = {"PATH": DEFAULT_PATH, "HOME": "/job", "AVM_OUT": "/job/out", **env}
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(full.items()))
    return f"cd /job || exit 125\nexec /.avm/bin/env -i {assigns} {shlex.join(argv)}\n"


def module_order(modules_dir: Path, wanted: Sequence[str]) -> list[Path]:
    """``.ko`` files for ``wanted`` and their dependencies, dependencies first (from modules.dep).

    Raises ``OperationalError('guest-module-missing')`` when a module is not in the golden rootfs."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(k).name.removesuffix(".ko"): k for k in deps if k.endswith(".ko")}
    order: list[str] = []

    def visit(rel: str) -> None:
        for dep in deps.get(rel, []):
            visit(dep)
        if rel not in order:
            order.append(rel)

    for name in wanted:
        rel = by_name.get(name)
        if rel is None:
            raise OperationalError(
                "guest-module-missing",
                f"kernel module {name} is not in {modules_dir}",
                hint="the golden image's kernel must ship virtio modules; rebuild it",
            )
        visit(rel)
    return [modules_dir / rel for rel in order]


def assemble(
    root: Path,
    *,
    busybox: Path,
    modules: Sequence[Path],
    argv: Sequence[str],
    env: Mapping[str, str],
    outputs: Sequence[str],
    inputs: Mapping[str, Path],
    net: Mapping[str, str] | None,
    secret: str,
    limits: Mapping[str, int],
    probe_script: str | None = None,
    etc_files: Mapping[str, bytes] | None = None,
) -> None:
    """Add /.avm, /job (with inputs) and the job user to an unpacked image root.

    ``etc_files`` (path under /etc -> bytes) replace the image's own: the egress gateway's hosts
    file, name resolution and trust bundle for a job that reaches names.

    ``secret`` frames the result (root-only file, removed by init before the job starts);
    ``limits`` are ``AVM_*_LIMIT`` byte counts the init enforces."""
    avm = root / ".avm"
    (avm / "bin").mkdir(parents=True, exist_ok=True)
    (avm / "kmod").mkdir(exist_ok=True)
    shutil.copy(busybox, avm / "bin" / "busybox")
    os.chmod(avm / "bin" / "busybox", 0o755)  # noqa: S103 - the guest runs it
    for m in modules:
        shutil.copy(m, avm / "kmod" / m.name)
    _write(avm / "modules", "".join(f"{m.name.removesuffix('.ko')}\n" for m in modules), 0o644)
    _write(avm / "init", INIT, 0o755)
    _write(avm / "job.sh", job_script(argv, env), 0o644)
    _write(avm / "outputs", "".join(f"{o}\n" for o in outputs), 0o644)
    _write(avm / "secret", secret + "\n", 0o600)
    _write(avm / "limits", "".join(f"{k}={int(v)}\n" for k, v in sorted(limits.items())), 0o644)
    _write(avm / "budget.sh", BUDGET, 0o644)
    if net:
        _write(avm / "net", "".join(f"{k}={shlex.quote(v)}\n" for k, v in net.items()), 0o644)
    if probe_script is not None:
        _write(avm / "probe.sh", probe_script, 0o644)
    job = root / "job"
    job.mkdir(exist_ok=True)
    for dest, src in inputs.items():
        target = job / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, target)
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    for name, line in (
        ("passwd", f"avmjob:x:{JOB_UID}:{JOB_UID}::/job:/.avm/bin/sh\n"),
        ("group", "avmjob:x:65534:\n"),
    ):
        path = etc / name
        if path.is_symlink():
            path.unlink()
        old = path.read_text() if path.is_file() else ""
        path.write_text(old + ("" if not old or old.endswith("\n") else "\n") + line)
    for rel, data in sorted((etc_files or {}).items()):
        target = etc / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.write_bytes(data)
        os.chmod(target, 0o644)


def _write(path: Path, text: str, mode: int) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def image_cpio(cache: Path, store: Path, image: StoredImage) -> tuple[Path, bool, list[str]]:
    """The image's layers, unpacked (whiteouts honoured) and written as a newc cpio, cached by
    manifest digest under ``cache`` (inside the 0700 avm home). Returns (path, cache hit, paths
    whose set-id bits were stripped).

    Every use re-hashes the image's blobs (``RefusedError('oci-blob-corrupt')``) and the cached
    cpio against the digest recorded when it was built; a cache that does not match is rebuilt."""
    from controlplane.jobs.oci.layers import unpack
    from controlplane.jobs.oci.store import verify_blob

    for blob in [image.manifest["config"], *image.layers]:
        verify_blob(store, blob["digest"])
    out = cache / f"{image.digest.split(':')[1]}.cpio"
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        recorded = json.loads(meta.read_text())
        if recorded.get("cpio_sha256") == _file_sha256(out):
            return out, True, list(recorded.get("setid_stripped", []))
    cache.mkdir(parents=True, exist_ok=True)
    stripped: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
        root = Path(tmp) / "root"
        unpack(store, image, root)
        etc = out.with_suffix(".etc")
        etc.mkdir(exist_ok=True)
        for name in ("passwd", "group"):  # the overlay appends the job user to the image's own files
            src = root / "etc" / name
            if src.is_file() and not src.is_symlink():
                shutil.copy(src, etc / name)
        write_cpio(root, Path(tmp) / "image.cpio", stripped)
        doc = {"cpio_sha256": _file_sha256(Path(tmp) / "image.cpio"), "setid_stripped": stripped}
        os.replace(Path(tmp) / "image.cpio", out)
        write_atomic(meta, json.dumps(doc, sort_keys=True).encode())
    return out, False, stripped


def build_initramfs(
    cache: Path, store: Path, image: StoredImage, out: Path, **overlay: Any
) -> tuple[int, bool, list[str]]:
    """The guest's initramfs: the cached image cpio followed by a small per-job cpio (/.avm, /job,
    /etc/passwd and /etc/group with the job user); the kernel unpacks both, the second over the
    first. ``overlay`` are the arguments of ``assemble``. Returns (bytes, image cache hit, set-id
    paths stripped)."""
    base, hit, stripped = image_cpio(cache, store, image)
    root = out.parent / "overlay"
    (root / "etc").mkdir(parents=True)
    for side in sorted(base.with_suffix(".etc").iterdir()):
        shutil.copy(side, root / "etc" / side.name)
    assemble(root, **overlay)
    write_cpio(root, out.parent / "overlay.cpio", stripped)
    with open(out, "wb") as fh:
        for part in (base, out.parent / "overlay.cpio"):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)
        size = fh.tell()
    shutil.rmtree(root)
    (out.parent / "overlay.cpio").unlink()
    return size, hit, stripped
