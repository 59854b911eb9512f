"""Booted snapshots of the qemu golden VM: keyed by their inputs, verified by sha256 before use.

A snapshot is a directory ``<store>/<key>/`` holding

    state.bin    the migration stream QEMU wrote while the booted guest waited at its identity gate
    disk.qcow2   the VM's overlay as it stood at that moment (its backing file: the golden qcow2)
    meta.json    the inputs, the key, and the sha256 and size of both files

The key is the sha256 of the canonical JSON of the inputs: the image digest, the QEMU version,
the QEMU arguments with the per-VM parts (state dir, SSH port, marker) replaced by
placeholders, and the sha256 of the initramfs. QEMU restores a state only onto the same machine,
so any change of these means another key: that snapshot is not used, a cold boot makes a new one.
A snapshot whose files do not match meta.json (or whose meta.json names other inputs) is
refused and removed, and the cold boot that follows rebuilds it.

The store is ``$AVM_SNAPSHOT_CACHE`` when set (the test suite shares one per run), else
``<home>/cache/snapshots``. Snapshots are published by an atomic rename of a finished
directory, so a concurrent or interrupted save never leaves a half snapshot under a key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.canonical import canonical_bytes
from controlplane.home import Home

SNAPSHOT_CACHE_ENV = "AVM_SNAPSHOT_CACHE"
STATE, DISK, META = "state.bin", "disk.qcow2", "meta.json"


def store(home: Home) -> Path:
    env = os.environ.get(SNAPSHOT_CACHE_ENV)
    return Path(env) if env else home.cache / "snapshots"


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.splitlines()[0].strip() if out.stdout else f"unknown (rc {out.returncode})"


def machine_args(argv: list[str], *, state: Path, port: int, marker: str) -> list[str]:
    """The QEMU arguments with what differs per VM replaced by placeholders (pure)."""
    return [
        a.replace(str(state), "<state>").replace(marker, "<marker>").replace(f":{port}-:", ":<port>-:")
        for a in argv
    ]


def inputs(
    *, image_digest: str, backing: Path, qemu: str, args: list[str], initrd_sha256: str
) -> dict[str, Any]:
    return {
        "image_digest": image_digest,
        "backing_qcow2": str(backing),
        "qemu_version": qemu,
        "machine_args": args,
        "initramfs_sha256": initrd_sha256,
    }


def key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(inputs)).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    dir: Path
    meta: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.dir / STATE

    @property
    def disk(self) -> Path:
        return self.dir / DISK

    def summary(self) -> dict[str, Any]:
        """What the receipt records: the key, and each file's sha256 and size."""
        return {"key": self.meta["key"], "files": self.meta["files"], "created_at": self.meta["created_at"]}


def find(root: Path, inputs: dict[str, Any]) -> tuple[Snapshot | None, dict[str, Any] | None]:
    """The snapshot for these inputs, if one is stored: ``(snapshot, None)``; ``(None, None)``
    when there is none; ``(None, refusal)`` when the stored one names other inputs (it is removed)."""
    k = key(inputs)
    path = root / k
    try:
        meta = json.loads((path / META).read_bytes())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        discard(path)
        return None, {"reason": "meta-unreadable", "actual": str(exc)}
    if meta.get("inputs") != inputs or meta.get("key") != k:
        discard(path)
        return None, {"reason": "inputs-changed", "expected": inputs, "actual": meta.get("inputs")}
    return Snapshot(path, meta), None


@dataclass
class Verifier:
    """Hashes a snapshot's files in a thread (while QEMU loads it); ``result()`` joins."""

    snap: Snapshot
    mismatch: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        for name in (STATE, DISK):
            want = self.snap.meta["files"][name]["sha256"]
            try:
                got = file_sha256(self.snap.dir / name)
            except OSError as exc:
                got = f"unreadable: {exc}"
            if got != want:
                self.mismatch.append({"file": name, "expected": want, "actual": got})
        self.seconds = round(time.monotonic() - t0, 3)

    def result(self) -> dict[str, Any] | None:
        """None if both files match meta.json, else the refusal (the snapshot is then removed)."""
        self._thread.join()
        if not self.mismatch:
            return None
        discard(self.snap.dir)
        return {"reason": "sha256-mismatch", "files": self.mismatch}


def staging(root: Path) -> Path:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = root / f".new-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir(mode=0o700)
    return path


def publish(tmp: Path, root: Path, inputs: dict[str, Any]) -> Snapshot:
    """Hash the staged files, write meta.json and rename the directory into place."""
    k = key(inputs)
    files = {}
    for name in (STATE, DISK):
        (tmp / name).chmod(0o400)
        files[name] = {"sha256": file_sha256(tmp / name), "size": (tmp / name).stat().st_size}
    meta = {"key": k, "inputs": inputs, "files": files, "created_at": time.time()}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    final = root / k
    try:
        tmp.rename(final)
    except OSError:  # another avm published this key first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
        meta = json.loads((final / META).read_bytes())
    return Snapshot(final, meta)


def discard(path: Path) -> None:
    """Remove a snapshot dir (renamed away first, so no one finds it half-deleted). VMs running
    on it keep their open file; new ones cannot pick it up."""
    trash = path.with_name(f".trash-{path.name}-{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
