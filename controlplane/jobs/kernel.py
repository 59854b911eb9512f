"""A minimal Tier-2 guest kernel built from Debian's linux-source: tinyconfig + a short fragment.

Everything a job guest needs (PVH, serial console, virtio-mmio/blk/net/console) is built in, so
the initramfs loads no modules. The build (about 3 min on 2 cores) is cached by the digest of
(source tarball name and size, fragment bytes); the kernel's own sha256 is recorded next to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import tarfile
import tempfile
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane._internal.progress import Progress
from controlplane.errors import CommandFailed, OperationalError

SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
# package data; ``images/guest-kernel.config`` at the top of the source tree is a symlink to it
FRAGMENT: Traversable = files("controlplane").joinpath("data/guest-kernel.config")


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    path: Path
    digest: str  # sha256 of the bzImage
    config_digest: str
    cached: bool


def config_digest(source: Path = SOURCE, fragment: Traversable = FRAGMENT) -> str:
    h = hashlib.sha256(b"avm-guest-kernel-v1\0")
    h.update(f"{source.name}\0{source.stat().st_size}\0".encode())
    h.update(fragment.read_bytes())
    return "sha256:" + h.hexdigest()


def cached(cache: Path, source: Path = SOURCE, fragment: Traversable = FRAGMENT) -> GuestKernel | None:
    if not source.is_file():
        return None
    digest = config_digest(source, fragment)
    out = cache / digest.split(":")[1]
    meta = out / "kernel.json"
    if not meta.is_file():
        return None
    doc = json.loads(meta.read_text())
    return GuestKernel(path=out / "bzImage", digest=doc["sha256"], config_digest=digest, cached=True)


def build(
    cache: Path,
    source: Path = SOURCE,
    fragment: Traversable = FRAGMENT,
    progress: Progress = print,
) -> GuestKernel:
    """Build (or return the cached) minimal kernel. Raises ``OperationalError('kernel-source-missing')``
    when linux-source is not installed and ``CommandFailed`` when make fails."""
    hit = cached(cache, source, fragment)
    if hit is not None:
        return hit
    if not source.is_file():
        raise OperationalError(
            "kernel-source-missing",
            f"{source} is not installed",
            hint="apt-get install linux-source-6.1 flex bison bc libelf-dev",
        )
    digest = config_digest(source, fragment)
    out = cache / digest.split(":")[1]
    with tempfile.TemporaryDirectory(
        prefix="avm-kbuild-", dir=cache.parent if cache.parent.is_dir() else None
    ) as tmp:
        progress(f"guest-kernel: unpacking {source.name}")
        with tarfile.open(source) as tar:
            tar.extractall(tmp, filter="fully_trusted")  # noqa: S202 - Debian-packaged source
        tree = next(p for p in Path(tmp).iterdir() if p.is_dir())
        (tree / "avm.config").write_bytes(fragment.read_bytes())
        steps = [
            ["make", "tinyconfig"],
            ["scripts/kconfig/merge_config.sh", "-m", ".config", "avm.config"],
            ["make", "olddefconfig"],
            ["make", "-j2", "bzImage"],
        ]
        for argv in steps:
            progress(f"guest-kernel: {' '.join(argv)}")
            proc = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=1800, check=False)
            if proc.returncode != 0:
                raise CommandFailed(
                    argv, proc.returncode, proc.stdout, proc.stderr, hint="see the make output"
                )
        image = (tree / "arch/x86/boot/bzImage").read_bytes()
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "bzImage", image)
        write_atomic(out / "config", (tree / ".config").read_bytes())
        sha = "sha256:" + hashlib.sha256(image).hexdigest()
        meta = {"sha256": sha, "config_digest": digest, "source": source.name}
        write_atomic(out / "kernel.json", json.dumps(meta, indent=2, sort_keys=True).encode())
    return GuestKernel(path=out / "bzImage", digest=sha, config_digest=digest, cached=False)


if __name__ == "__main__":
    import sys

    k = build(Path(sys.argv[1]))
    print(k.path, k.digest, k.config_digest)
