"""The snapshot store's own rules, on real files: keys from inputs, refusals, the gate's files.

What a restore does with them is proven on real QEMU in tests/test_vm_warm_qemu.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from controlplane import guestscripts
from controlplane.vm import initramfs, snapshot
from controlplane.vm.seed import placeholder_tar, sshd_dropin

INPUTS = snapshot.inputs(
    image_digest="sha256:" + "a" * 64,
    backing=Path("/var/tmp/avm-image-cache/x/golden.qcow2"),
    qemu="QEMU emulator version 7.2.22",
    args=["qemu-system-x86_64", "-m", "1024"],
    initrd_sha256="b" * 64,
)


def _stored(root: Path, inputs: dict[str, object]) -> Path:
    tmp = snapshot.staging(root)
    (tmp / snapshot.STATE).write_bytes(b"state")
    (tmp / snapshot.DISK).write_bytes(b"disk")
    return snapshot.publish(tmp, root, dict(inputs)).dir


def test_the_per_vm_parts_of_the_qemu_arguments_do_not_change_the_key() -> None:
    state, marker = Path("/h/run/vms/a"), "avm-vm-a-0123"
    argv = ["-name", f"{marker},process={marker}", "-qmp", f"unix:{state}/qmp.sock,server=on", "-m", "1024"]
    other = [a.replace(str(state), "/h/run/vms/b").replace(marker, "avm-vm-b-4567") for a in argv]
    norm = snapshot.machine_args(argv, state=state, port=2222, marker=marker)
    assert norm == [
        "-name",
        "<marker>,process=<marker>",
        "-qmp",
        "unix:<state>/qmp.sock,server=on",
        "-m",
        "1024",
    ]
    assert snapshot.machine_args(other, state=Path("/h/run/vms/b"), port=2223, marker="avm-vm-b-4567") == norm


def test_any_changed_input_is_another_key() -> None:
    changed = [
        {**INPUTS, "qemu_version": "QEMU emulator version 8.0.0"},
        {**INPUTS, "image_digest": "sha256:" + "c" * 64},
        {**INPUTS, "machine_args": ["qemu-system-x86_64", "-m", "1280"]},
        {**INPUTS, "initramfs_sha256": "d" * 64},
    ]
    assert len({snapshot.key(INPUTS), *(snapshot.key(c) for c in changed)}) == 5


def test_a_published_snapshot_is_found_by_its_inputs_only(tmp_path: Path) -> None:
    path = _stored(tmp_path, INPUTS)
    assert path == tmp_path / snapshot.key(INPUTS)
    found, refused = snapshot.find(tmp_path, INPUTS)
    assert (found is not None, refused) == (True, None)
    assert found is not None and found.meta["files"][snapshot.STATE] == {
        "sha256": snapshot.file_sha256(path / snapshot.STATE),
        "size": 5,
    }
    assert snapshot.find(tmp_path, {**INPUTS, "qemu_version": "other"}) == (None, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no staging dir left


def test_a_snapshot_whose_meta_names_other_inputs_is_refused_and_removed(tmp_path: Path) -> None:
    path = _stored(tmp_path, INPUTS)
    meta = json.loads((path / snapshot.META).read_text())
    meta["inputs"]["qemu_version"] = "QEMU emulator version 6.0.0"
    (path / snapshot.META).write_text(json.dumps(meta))
    found, refused = snapshot.find(tmp_path, INPUTS)
    assert found is None
    assert refused == {"reason": "inputs-changed", "expected": INPUTS, "actual": meta["inputs"]}
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_file_fails_verification_and_the_snapshot_is_removed(tmp_path: Path) -> None:
    path = _stored(tmp_path, INPUTS)
    found, _ = snapshot.find(tmp_path, INPUTS)
    assert found is not None
    (path / snapshot.DISK).chmod(0o600)
    (path / snapshot.DISK).write_bytes(b"dusk")
    refused = snapshot.Verifier(found).result()
    assert refused == {
        "reason": "sha256-mismatch",
        "files": [
            {
                "file": snapshot.DISK,
                "expected": found.meta["files"][snapshot.DISK]["sha256"],
                "actual": hashlib.sha256(b"dusk").hexdigest(),
            }
        ],
    }
    assert list(tmp_path.iterdir()) == []


def test_the_gate_ships_the_sshd_drop_in_every_qemu_vm_gets() -> None:
    assert guestscripts.data("sshd-avm.conf").decode() == sshd_dropin(None, None)
    assert initramfs.GATE_FILES == (
        "identity_gate.py",
        "avm-identity.service",
        "sshd-avm.conf",
        "avm-first.conf",
        "avm-session-priority.conf",
    )


def _members(data: bytes) -> dict[str, tuple[int, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {
            m.name: (m.mode, (tar.extractfile(m) or io.BytesIO()).read() if m.isfile() else b"")
            for m in tar.getmembers()
        }


def test_the_placeholder_host_key_is_fresh_per_boot_and_nothing_else() -> None:
    """The qemu boot's throwaway host key: only the key pair (no login key, no sshd drop-in),
    private half 0600, and another one for every boot."""
    one, two = _members(placeholder_tar("p1")), _members(placeholder_tar("p1"))
    files = {"etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub"}
    assert {n for n, (_mode, data) in one.items() if data} == files
    assert one["etc/ssh/ssh_host_ed25519_key"][0] == 0o600
    assert one["etc/ssh/ssh_host_ed25519_key.pub"][1].startswith(b"ssh-ed25519 ")
    assert one["etc/ssh/ssh_host_ed25519_key"][1] != two["etc/ssh/ssh_host_ed25519_key"][1]
