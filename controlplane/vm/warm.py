"""Warm start for the qemu backend: restore a booted snapshot, or cold-boot and make one.

    inputs -> key -> snapshot in the store?
      yes: overlay on its disk -> QEMU -incoming its state (sha256 checked meanwhile)
           -> paused -> hashes match? -> cont -> deliver identity at the gate -> forward SSH
           (a mismatch: kill that QEMU, remove the snapshot, go cold)
      no:  overlay on the golden qcow2 -> QEMU boots -> gate says "waiting"
           -> settle -> stop, save state, copy overlay, publish -> cont -> identity -> forward
    --cold: boot cold, deliver identity; no snapshot is used or made

Whichever way, the VM's identity arrives through the same gate before the host forwards the
SSH port (``hostfwd_add``): until then nothing outside the guest can reach its sshd, and from
the first connection on sshd serves the host key the lifecycle pinned. What happened is returned as the
``warm_start`` observation, which the ``vm-up`` receipt records.
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controlplane.errors import OperationalError, UsageError
from controlplane.vm import identity, procs, snapshot
from controlplane.vm.base import BootRequest
from controlplane.vm.qmp import Qmp

Spawn = Callable[[list[str]], subprocess.Popen[bytes]]
Overlay = Callable[[Path], None]


def start(
    request: BootRequest,
    argv: list[str],
    *,
    qemu_version: str,
    initrd_sha256: str,
    overlay: Overlay,
    spawn: Spawn,
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start the VM (warm or cold) and deliver its identity; returns its process and the
    ``warm_start`` observation. Raises ``OperationalError`` (``vm-boot-failed``, ``qmp-failed``)."""
    state = request.state_dir
    inputs = snapshot.inputs(
        image_digest=request.image.digest,
        backing=request.image.qcow2,
        qemu=qemu_version,
        args=snapshot.machine_args(argv, state=state, port=request.ssh_port, marker=request.marker),
        initrd_sha256=initrd_sha256,
    )
    root = snapshot.store(request.home)
    info: dict[str, Any] = {"key": snapshot.key(inputs), "inputs": inputs, "store": str(root)}
    timeout = request.spec.timeout_s
    if request.spec.cold:
        info["reason"] = "--cold: no snapshot used or made"
    else:
        snap, refused = snapshot.find(root, inputs)
        if refused:
            info["refused"] = refused
        if snap is not None:
            proc = _restore(request, argv, snap, overlay, spawn, info)
            if proc is not None:
                return proc, info
        info.setdefault("reason", "no snapshot for these inputs")
    overlay(request.image.qcow2)
    proc = spawn(argv)
    t0 = time.monotonic()
    request.meanwhile()
    gate = identity.Gate(state, timeout_s=timeout)
    try:
        gate.wait()
        info["gate_reached_s"] = round(time.monotonic() - t0, 3)
        if not request.spec.cold:
            settled = gate.settle()
            info["settled"] = {"polls": settled.get("polls"), "jobs_left": settled.get("left")}
            gate.close()
            info["snapshot"] = _save(state, root, inputs, info)
            gate = identity.Gate(state, timeout_s=timeout)
        info["identity"] = _ack(gate.deliver(request.seed))
    finally:
        gate.close()
    forward(state, request.ssh_port)
    info["path"] = "cold"
    return proc, info


def _restore(
    request: BootRequest,
    argv: list[str],
    snap: snapshot.Snapshot,
    overlay: Overlay,
    spawn: Spawn,
    info: dict[str, Any],
) -> subprocess.Popen[bytes] | None:
    """Restore ``snap``; None (nothing left running) when its files fail verification."""
    state = request.state_dir
    t0 = time.monotonic()
    verifier = snapshot.Verifier(snap)  # hashes while QEMU loads; the guest runs only after both
    overlay(snap.disk)
    proc = spawn([*argv, "-incoming", f"exec:cat {shlex.quote(str(snap.state))}"])
    request.meanwhile()  # QEMU loads the state for about 0.3 s: time enough
    refused: dict[str, Any] | None = None
    try:
        with Qmp(state / "qmp.sock", timeout_s=60) as qmp:
            qmp.wait_status("paused", timeout_s=120)
            info["loaded_s"] = round(time.monotonic() - t0, 3)
            refused = verifier.result()
            if refused is None:
                qmp.execute("cont")
                resumed = time.monotonic()
    except OperationalError:
        # QEMU may reject a damaged stream before the hashes are done: the hashes say which it was
        refused = verifier.result()
        if refused is None:
            raise
    info["verify_s"] = verifier.seconds
    if refused is not None:
        info["refused"] = refused
        _kill(proc, request.marker)
        (state / "disk.qcow2").unlink(missing_ok=True)
        for name in ("qmp.sock", identity.SOCKET, "qemu.pid"):
            (state / name).unlink(missing_ok=True)
        return None
    gate = identity.Gate(state, timeout_s=30)
    try:
        info["identity"] = _ack(gate.deliver(request.seed))
        info["identity_s"] = round(time.monotonic() - resumed, 3)  # from cont to the guest's ack
    finally:
        gate.close()
    forward(state, request.ssh_port)
    info.update(path="warm", snapshot=snap.summary(), restore_s=round(time.monotonic() - t0, 3))
    return proc


def forward(state: Path, port: int) -> None:
    """Forward 127.0.0.1:port to the guest's sshd: only now can anything outside reach it.
    Raises ``UsageError('port-taken')`` when QEMU cannot bind the port."""
    with Qmp(state / "qmp.sock") as qmp:
        rule = f"hostfwd_add n0 tcp:127.0.0.1:{port}-:22"
        said = qmp.execute("human-monitor-command", **{"command-line": rule})
    if str(said).strip():
        raise UsageError(
            "port-taken",
            f"QEMU could not forward 127.0.0.1:{port} to the VM: {str(said).strip()}",
            hint="another process took the port meanwhile; retry, or pick another --ssh-port",
            details={"expected": "an empty reply", "actual": str(said).strip()},
        )


def _save(state: Path, root: Path, inputs: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Stop the guest (waiting at its gate), save its state and disk as a snapshot, resume it."""
    t0 = time.monotonic()
    tmp = snapshot.staging(root)
    try:
        with Qmp(state / "qmp.sock", timeout_s=120) as qmp:
            qmp.execute("stop")  # stopping flushes the disk: the overlay copy below is consistent
            qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(tmp / snapshot.STATE))}")
            qmp.wait_migration(timeout_s=120)
            shutil.copyfile(state / "disk.qcow2", tmp / snapshot.DISK)
            qmp.execute("cont")
        snap = snapshot.publish(tmp, root, inputs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["snapshot_save_s"] = round(time.monotonic() - t0, 3)
    return {"made": True, **snap.summary()}


def _ack(reply: dict[str, Any]) -> dict[str, Any]:
    """The guest's acknowledgement as recorded: its new machine-id (not secret) and the sha256
    of 32 bytes it read from /dev/urandom right after the reseed (the bytes are used for nothing)."""
    sample = str(reply.get("urandom_after_reseed", ""))
    return {
        "machine_id": reply.get("machine_id"),
        "urandom_sample_sha256": hashlib.sha256(sample.encode()).hexdigest(),
        "guest_install_s": float(reply.get("install_s", "nan")),
    }


def _kill(proc: subprocess.Popen[bytes], marker: str) -> None:
    procs.signal_pids([proc.pid], signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    procs.signal_pids(procs.pids_with_marker(marker), signal.SIGKILL)
    procs.wait_gone([proc.pid], marker, 10)
