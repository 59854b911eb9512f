"""The golden VM's boot initramfs: busybox, the virtio modules, and the per-VM seed.

The Debian cloud kernel has virtio as modules, so the root disk needs an initramfs. Debian's own
is 16 MB and slow under TCG; this one is about 1 MB: busybox-static, the modules needed to see
the disk and fw_cfg (taken from the image's own /lib/modules, loaded in dependency order), and
an ``/init`` that mounts the root, extracts the per-VM seed tar that QEMU passes as fw_cfg
``opt/avm/seed`` (host key, authorized key, sshd drop-in, hostname) onto it, and switches root.
So the image stays immutable and keyless, and every VM gets its own identity before sshd starts.
With ``avm.identity=gate`` on the cmdline (the qemu backend, for warm starts) it installs the
identity gate instead (``guestscripts/identity_gate.py``), which takes the identity the host
writes to a virtio-serial port after a cold boot or a restore from a snapshot; the host forwards
the SSH port only once that is in (``vm.warm``).

Built once per image digest, cached next to the VM state in ``<home>/cache/initramfs/``.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

from controlplane import guestscripts
from controlplane._internal.archive import write_cpio
from controlplane._internal.fs import write_atomic
from controlplane.canonical import sha256_hex
from controlplane.errors import OperationalError

BUSYBOX = Path("/bin/busybox")
# what the guest needs before switch_root; their dependencies come from modules.dep
WANTED = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "qemu_fw_cfg", "virtio_console")
SEED_NAME = "opt/avm/seed"
# qemu's throwaway host key (vm.seed.placeholder_tar), installed only where the root has none
PLACEHOLDER_NAME = "opt/avm/placeholder"

# the initramfs /init (busybox sh), with the fw_cfg name of the seed filled in
INIT = (
    guestscripts.text("initramfs_init")
    .replace("@SEED@", SEED_NAME)
    .replace("@PLACEHOLDER@", PLACEHOLDER_NAME)
)
# the warm-start identity gate, copied onto the root when the cmdline says avm.identity=gate
# (virtio_console above gives it its port before udev runs)
GATE_FILES = (
    "identity_gate.py",
    "avm-identity.service",
    "sshd-avm.conf",
    "avm-first.conf",
    "avm-session-priority.conf",
)
GATE_ARG = "avm.identity=gate"


def _closure(rootfs: Path, kernel_version: str) -> list[str]:
    """The wanted modules and their dependencies, dependencies first (relative paths)."""
    moddir = rootfs / "lib" / "modules" / kernel_version
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    by_stem = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        if path not in order:
            order.append(path)

    for stem in WANTED:
        if stem not in by_stem:
            raise OperationalError(
                "initramfs-module-missing",
                f"kernel module {stem} is not in the image's /lib/modules/{kernel_version}",
                hint="keep it in images/golden.yaml trim.kernel_modules_keep and rebuild the image",
            )
        visit(by_stem[stem])
    return order


def build(rootfs: Path, kernel_version: str, cache: Path) -> Path:
    """The initramfs for this rootfs (cached by content). Raises ``OperationalError``."""
    if not BUSYBOX.exists():
        raise OperationalError(
            "tool-missing", "busybox-static is not installed", hint="install busybox-static (`make setup`)"
        )
    modules = _closure(rootfs, kernel_version)
    moddir = rootfs / "lib" / "modules" / kernel_version
    gate = b"".join(guestscripts.data(name) for name in GATE_FILES)
    key = sha256_hex(
        "\n".join([INIT, kernel_version, *modules]).encode() + gate + BUSYBOX.read_bytes()[:4096]
    )[:24]
    out = cache / f"golden-initramfs-{key}.cpio.gz"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    # newc cpio is what the kernel unpacks: build the tree, archive it, gzip it
    work = cache / f".build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        (work / "bin").mkdir(parents=True)
        (work / "modules").mkdir()
        (work / "gate").mkdir()
        for name in GATE_FILES:
            (work / "gate" / name).write_bytes(guestscripts.data(name))
        shutil.copy2(BUSYBOX, work / "bin" / "busybox")
        (work / "init").write_text(INIT)
        (work / "init").chmod(0o755)
        names = []
        for rel in modules:
            name = Path(rel).name
            shutil.copy2(moddir / rel, work / "modules" / name)
            names.append(name)
        (work / "modules.order").write_text("\n".join(names) + "\n")
        _cpio(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def for_rootfs(rootfs: Path, cache: Path) -> Path:
    """The initramfs for an image's rootfs, for the newest kernel whose modules it ships.

    Raises ``OperationalError('image-incomplete')`` when the rootfs has no kernel modules."""
    versions = sorted(p.name for p in (rootfs / "lib" / "modules").glob("*") if p.is_dir())
    if not versions:
        raise OperationalError("image-incomplete", f"no kernel modules under {rootfs}/lib/modules")
    return build(rootfs, versions[-1], cache)


def _cpio(tree: Path, out: Path) -> None:
    raw = out.with_suffix(".raw")
    write_cpio(tree, raw)
    write_atomic(out, gzip.compress(raw.read_bytes(), compresslevel=6, mtime=0))
    raw.unlink()
