"""What makes two builds of one recipe, from the same packages, the same bytes.

Each source of difference between two builds, and what removes it:

- file times: mmdebstrap gets ``SOURCE_DATE_EPOCH`` (maintainer scripts, shadow, initramfs-tools
  honour it); afterwards ``normalize_rootfs`` clamps every mtime above the recipe's source date
  to it and sets atime to mtime. ctime cannot be set from user space and ``mkfs.ext4 -d`` copies
  it, so ``fix_inode_times`` rewrites ctime, atime and crtime of every used inode with
  ``debugfs``; ``E2FSPROGS_FAKE_TIME`` fixes the superblock and new-inode times of mkfs and debugfs.
- the file system identity: ``mkfs.ext4 -U`` and ``-E hash_seed=`` get UUIDs derived from the
  recipe digest (``fs_identity``). mkfs 1.47 adds directory entries in sorted order.
- build-host leftovers (``LEAKS``): logs, apt caches and lists, ldconfig's aux cache, dpkg and
  debconf backups, the random seed, a rebuild's version pins. Removed by ``normalize_rootfs``.
- qcow2: ``qemu-img convert`` of identical raw bytes is identical (checked by the test).

``compare_trees`` is the pure comparer that names each file whose bytes differ and its cause.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from controlplane._internal import tools as imagetools
from controlplane.errors import OperationalError
from controlplane.image.golden import file_sha256
from controlplane.transport.base import RunResult

PINS_FILE = "etc/apt/preferences.d/avm-pins"
# (glob relative to the rootfs, why it differs between builds); only regular files are removed
LEAKS: tuple[tuple[str, str], ...] = (
    ("var/log/*", "a build log: dpkg, apt and alternatives write build-time timestamps"),
    ("var/log/*/*", "a build log: dpkg, apt and alternatives write build-time timestamps"),
    ("var/cache/apt/*.bin", "apt's binary cache of the build-time package lists"),
    ("var/lib/apt/lists/*", "apt's package lists: the mirror state at build time"),
    ("var/cache/ldconfig/aux-cache", "ldconfig's aux cache: inode numbers and times of the build's files"),
    ("var/cache/debconf/*-old", "a debconf backup from the build"),
    ("var/lib/dpkg/*-old", "a dpkg database backup from the build"),
    ("var/lib/systemd/random-seed", "a random seed: every clone would share it"),
    ("var/lib/dbus/machine-id", "the build's D-Bus machine id"),
    (PINS_FILE, "the package version pins of a rebuild"),
)
# why a file differs when it is not a known leftover (first match wins)
CAUSES: tuple[tuple[str, str], ...] = (
    ("*.pyc", "Python bytecode compiled at install time (marshal output or the source time it embeds)"),
    ("etc/shadow*", "the password-change day in shadow (days since the epoch at build time)"),
    ("etc/ssh/ssh_host_*", "SSH host keys generated at install time"),
    ("boot/initrd.img-*", "the initramfs, packed at install time (cpio times or order)"),
    ("var/cache/debconf/*", "debconf's database, written in hash order"),
    ("var/lib/dpkg/*", "the dpkg database"),
    ("etc/machine-id", "the machine id"),
)


def fs_identity(recipe_digest: str) -> tuple[str, str]:
    """(file system UUID, directory hash seed) for ``mkfs.ext4``: fixed by the recipe digest."""

    def derive(label: str) -> str:
        raw = hashlib.sha256(f"avm-ext4-{label}\0{recipe_digest}".encode()).digest()[:16]
        return str(uuid.UUID(bytes=raw, version=4))

    return derive("uuid"), derive("hash-seed")


def normalize_rootfs(rootfs: Path, epoch: int) -> dict[str, Any]:
    """Remove build-host leftovers and clamp every file time to ``epoch``. Returns what it did."""
    removed: list[str] = []
    for pattern, _cause in LEAKS:
        for path in sorted(rootfs.glob(pattern)):
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(str(path.relative_to(rootfs)))
    clamped = 0
    entries = (Path(d) / n for d, dirs, files in os.walk(rootfs) for n in (*dirs, *files))
    for path in (rootfs, *entries):
        st = path.lstat()
        mtime = min(int(st.st_mtime), epoch)
        clamped += st.st_mtime > epoch
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return {"removed": removed, "clamped_mtimes": clamped, "source_date_epoch": epoch}


def used_inodes(dumpe2fs_output: str) -> list[int]:
    """Inode numbers in use, from ``dumpe2fs`` output (the complement of its free ranges). Pure."""
    found = re.search(r"^Inode count:\s+(\d+)$", dumpe2fs_output, re.M)
    if found is None:
        raise OperationalError(
            "dumpe2fs-unparseable",
            "dumpe2fs printed no 'Inode count:' line",
            hint="the ext4 image may be damaged; rebuild with --force",
        )
    count = int(found.group(1))
    free: set[int] = set()
    for line in re.findall(r"^\s+Free inodes: ?(.*)$", dumpe2fs_output, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            low, _, high = part.partition("-")
            free.update(range(int(low), int(high or low) + 1))
    return [n for n in range(1, count + 1) if n not in free]


def fix_inode_times(raw: Path, epoch: int) -> list[RunResult]:
    """Set ctime, atime and crtime of every used inode of the ext4 image ``raw`` to ``epoch``."""
    listing = imagetools.dumpe2fs(raw, epoch)
    script = raw.with_name(".inode-times.debugfs")
    script.write_text(
        "".join(
            f"sif <{n}> {field} @{epoch}\n"
            for n in used_inodes(listing.stdout)
            for field in ("ctime", "atime", "crtime")
        )
    )
    try:
        run = imagetools.debugfs_script(raw, script, epoch)
    finally:
        script.unlink()
    # debugfs exits 0 even when a command fails; it says so on stderr after its version banner
    errors = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
    if errors:
        raise OperationalError(
            "image-inode-times-failed",
            f"debugfs could not set inode times in {raw.name}: {errors[0]}",
            hint="the ext4 image may be damaged; rebuild with --force",
            details={"errors": errors[:20]},
        )
    return [listing, run]


def pins_text(package_set: Sequence[str]) -> str:
    """An apt preferences file holding every ``name:arch=version`` of ``package_set``."""
    out = []
    for entry in package_set:
        name, _, version = entry.partition("=")
        out.append(f"Package: {name.partition(':')[0]}\nPin: version {version}\nPin-Priority: 1001\n")
    return "\n".join(out)


def snapshot(rootfs: Path) -> dict[str, dict[str, Any]]:
    """path -> {type, mode, uid, gid, mtime, size, sha256 | target | rdev} for every entry."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            entry: dict[str, Any] = {
                "mode": oct(stat.S_IMODE(st.st_mode)),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime": int(st.st_mtime),
            }
            if stat.S_ISREG(st.st_mode):
                entry.update(type="file", size=st.st_size, sha256=file_sha256(path))
            elif stat.S_ISLNK(st.st_mode):
                entry.update(type="link", target=os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entry.update(type="dir")
            else:
                entry.update(type="other", rdev=st.st_rdev)
            out[str(path.relative_to(rootfs))] = entry
    return out


def cause_of(path: str, fields: Sequence[str]) -> str:
    """Why ``path`` differs between two builds, as far as avm knows. Pure."""
    for pattern, cause in (*LEAKS, *CAUSES):
        if fnmatch.fnmatchcase(path, pattern):
            return cause
    if list(fields) == ["mtime"]:
        return "only its time: written during the build at a time the clamp did not reach"
    if "absent" in fields:
        return "present in one build only: generated at build time, or a package set difference"
    return "content generated at build time (compare the two files)"


Snapshot = Mapping[str, Mapping[str, Any]]


def compare_trees(a: Snapshot, b: Snapshot) -> list[dict[str, Any]]:
    """Every path whose entry differs between two snapshots, with the fields and the cause. Pure."""
    diffs = []
    for path in sorted(set(a) | set(b)):
        left, right = a.get(path), b.get(path)
        if left == right:
            continue
        if left is None or right is None:
            fields = ["absent"]
            values: dict[str, Any] = {"first": left is not None, "second": right is not None}
        else:
            fields = sorted(k for k in set(left) | set(right) if left.get(k) != right.get(k))
            values = {k: [left.get(k), right.get(k)] for k in fields}
        diffs.append({"path": path, "fields": fields, "values": values, "cause": cause_of(path, fields)})
    return diffs
