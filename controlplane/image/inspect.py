"""The inspect stage of the image build: no shared host keys, exactly one kernel, sizes to watch."""

from __future__ import annotations

import shutil
from pathlib import Path

from controlplane.errors import OperationalError, RefusedError
from controlplane.image.golden import GoldenImage


def image_sizes(image: GoldenImage) -> dict[str, int]:
    """Sizes worth watching (bytes): rootfs content, raw (apparent and allocated), qcow2, kernel."""
    arts = image.manifest.artifacts
    return {
        "rootfs_bytes": image.manifest.rootfs.bytes,
        "raw_apparent_bytes": arts["raw"].size,
        "raw_allocated_bytes": image.raw.stat().st_blocks * 512,
        "qcow2_bytes": arts["qcow2"].size,
        "kernel_bytes": arts["kernel"].size,
        "initrd_bytes": arts["initrd"].size,
    }


def refuse_host_keys(rootfs: Path) -> None:
    keys = sorted(str(p.relative_to(rootfs)) for p in (rootfs / "etc/ssh").glob("ssh_host_*"))
    if keys:
        raise RefusedError(
            "image-unsafe",
            f"SSH host keys are present in the image ({', '.join(keys)}): every VM would share them",
            hint="rebuild with `avm image build --force`; the customize hook removes them",
            details={"keys": keys},
        )


def copy_kernel(rootfs: Path, kernel: Path, initrd: Path) -> str:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise OperationalError(
            "image-kernel-missing",
            f"expected exactly one kernel in {rootfs / 'boot'}, found {[k.name for k in kernels]}",
            hint="the recipe must install exactly one kernel package (linux-image-cloud-amd64)",
        )
    version = kernels[0].name.removeprefix("vmlinuz-")
    ramdisk = rootfs / "boot" / f"initrd.img-{version}"
    if not ramdisk.is_file():
        raise OperationalError(
            "image-kernel-missing",
            f"{ramdisk} is missing: the kernel has no initramfs",
            hint="add initramfs-tools to the recipe's packages",
        )
    shutil.copyfile(kernels[0], kernel)
    shutil.copyfile(ramdisk, initrd)
    return version
