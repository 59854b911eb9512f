"""Warm start on the real QEMU backend: VMs restored from one booted snapshot are separate machines.

Every VM restored from the same snapshot resumes the same RAM: the same kernel RNG state, the
same machine-id, no SSH identity yet. These tests boot real restored VMs and look from outside
(the pinned SSH host key, what the guest reads, the SSH key exchange) and inside (files, ids).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from paramiko.kex_curve25519 import KexCurve25519

from controlplane.canonical import canonical_bytes
from controlplane.home import Home
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from controlplane.vm import lifecycle, snapshot
from controlplane.vm.seed import fingerprint
from tests.plugins.vms import last_receipt, run_avm

UP = ("--json", "vm", "up")


def up(home: Home, name: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = run_avm(home, *UP, name, "--timeout", "400", *args, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    warm: dict[str, Any] = json.loads(out.stdout)["observations"]["warm_start"]
    return warm


def down(home: Home, name: str, env: dict[str, str] | None = None) -> None:
    out = run_avm(home, "vm", "down", name, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


class VmList:
    """The VMs a test started; the fixture takes down whatever is still up, whatever failed."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.running: dict[str, dict[str, str] | None] = {}

    def up(self, name: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        self.running[name] = env
        return up(self.home, name, *args, env=env)

    def down(self, name: str) -> None:
        down(self.home, name, env=self.running.pop(name))


@pytest.fixture
def vms(golden_home: Home) -> Iterator[VmList]:
    started = VmList(golden_home)
    yield started
    for name in list(started.running):
        started.down(name)


@pytest.fixture(scope="module")
def booted_snapshot(golden_home: Home, snapshot_store: Path) -> Path:
    """The run's snapshot of the default VM: the one a default ``vm up`` uses (and makes, if no
    test made it yet). Other tests' VMs (another memory size, ...) leave snapshots of their own in
    the same store, so it is found by the key this ``vm up`` reports, not by being the only one."""
    warm = up(golden_home, "wseed")
    down(golden_home, "wseed")
    snap: Path = snapshot_store / str(warm["key"])  # made now (cold) or restored (warm): it exists
    assert (snap / snapshot.META).is_file(), sorted(p.name for p in snapshot_store.iterdir())
    return snap


@pytest.fixture
def private_store(tmp_path: Path, booted_snapshot: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A copy of the run's snapshot in a store of this test's own (so it can damage it)."""
    store = tmp_path / "snapshots"
    store.mkdir()
    shutil.copytree(booted_snapshot, store / booted_snapshot.name)
    yield store, {snapshot.SNAPSHOT_CACHE_ENV: str(store)}


@pytest.fixture
def kex_server_keys(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Records the server's ephemeral curve25519 key of every key exchange in this process."""
    seen: list[bytes] = []
    # paramiko's stubs do not declare this private method
    original: Callable[[KexCurve25519, paramiko.Message], None] = KexCurve25519._parse_kexecdh_reply  # type: ignore[attr-defined]

    def recording(self: KexCurve25519, m: paramiko.Message) -> None:
        pos = m.packet.tell()
        m.get_string()  # the host key
        seen.append(m.get_string())  # Q_S: the server's ephemeral public key
        m.packet.seek(pos)
        original(self, m)

    monkeypatch.setattr(KexCurve25519, "_parse_kexecdh_reply", recording)
    return seen


def _look(home: Home, name: str) -> dict[str, Any]:
    """One SSH session: the first thing read is /dev/urandom, then the identity the guest has."""
    with SshTransport.from_target(inventory.load(home, name)) as ssh:
        urandom = ssh.run(["od", "-An", "-tx1", "-N32", "/dev/urandom"], timeout=60).check().stdout
        transport = ssh._transport()
        return {
            "urandom": "".join(urandom.split()),
            "session_id": transport.session_id,
            "machine_id": ssh.run(["cat", "/etc/machine-id"], timeout=60).check().stdout.strip(),
            "hostname": ssh.run(["hostname"], timeout=60).check().stdout.strip(),
            "host_key": ssh.run(["ssh-keygen", "-lf", "/etc/ssh/ssh_host_ed25519_key.pub"], timeout=60)
            .check()
            .stdout.split()[1],
        }


def _exists(home: Home, name: str, path: str) -> int:
    with SshTransport.from_target(inventory.load(home, name)) as ssh:
        return ssh.run(["test", "-e", path], timeout=60).rc


def test_two_vms_restored_from_one_snapshot_are_different_machines_with_clean_disks(
    golden_home: Home, booted_snapshot: Path, kex_server_keys: list[bytes], vms: VmList
) -> None:
    warm = {n: vms.up(n) for n in ("wa", "wb")}
    assert [w["path"] for w in warm.values()] == ["warm", "warm"]
    assert {w["snapshot"]["key"] for w in warm.values()} == {booted_snapshot.name}
    seen = {n: _look(golden_home, n) for n in warm}
    a, b = seen["wa"], seen["wb"]
    # each serves the host key pinned for it before the first connection, and they differ
    assert a["host_key"] == lifecycle.load_record(golden_home, "wa").host_key_fingerprint
    assert b["host_key"] == lifecycle.load_record(golden_home, "wb").host_key_fingerprint
    assert a["host_key"] != b["host_key"]
    assert (a["hostname"], b["hostname"]) == ("avm-wa", "avm-wb")
    # the machine-id the host sent, a different one in each
    assert a["machine_id"] == warm["wa"]["identity"]["machine_id"]
    assert b["machine_id"] == warm["wb"]["identity"]["machine_id"]
    assert len(a["machine_id"]) == 32 and a["machine_id"] != b["machine_id"]
    # randomness: what the gate read right after the reseed, and the first read over SSH
    samples = [w["identity"]["urandom_sample_sha256"] for w in warm.values()]
    assert len(samples[0]) == 64 and samples[0] != samples[1]
    assert len(a["urandom"]) == 64 and a["urandom"] != b["urandom"]
    # sshd's side of the key exchange: its ephemeral keys and the session ids differ
    # (both exchanges were curve25519: the recorder sits in that key exchange only)
    assert len(kex_server_keys) == 2 and kex_server_keys[0] != kex_server_keys[1]
    assert a["session_id"] != b["session_id"]
    # clean disks: a file written in one is absent from the other, and from the next one
    with SshTransport.from_target(inventory.load(golden_home, "wa")) as ssh:
        ssh.run(["sh", "-c", "echo a > /root/only-in-wa && sync"], timeout=60).check()
    marker = "/root/only-in-wa"
    assert (_exists(golden_home, "wa", marker), _exists(golden_home, "wb", marker)) == (0, 1)
    vms.down("wa")
    assert vms.up("wc")["path"] == "warm"
    assert _exists(golden_home, "wc", marker) == 1
    machine_ids = {a["machine_id"], b["machine_id"], _look(golden_home, "wc")["machine_id"]}
    assert len(machine_ids) == 3


def test_the_receipt_records_the_snapshot_used_its_sha256_and_inputs(
    golden_home: Home, booted_snapshot: Path, vms: VmList
) -> None:
    warm = vms.up("wr")
    receipt = last_receipt(golden_home, "vm-up")
    meta = json.loads((booted_snapshot / "meta.json").read_text())
    recorded = receipt["observations"]["warm_start"]
    assert (receipt["result"]["start_path"], recorded["path"]) == ("warm", "warm")
    assert recorded["snapshot"]["files"] == meta["files"]
    assert recorded["inputs"] == meta["inputs"]
    digest = hashlib.sha256(canonical_bytes(meta["inputs"])).hexdigest()
    assert recorded["key"] == booted_snapshot.name == digest
    assert meta["files"]["state.bin"]["sha256"] == snapshot.file_sha256(booted_snapshot / "state.bin")
    assert recorded == warm
    # no secret of the VM is in it
    text = json.dumps(receipt)
    assert "PRIVATE KEY" not in text and "entropy" not in text


def test_a_corrupted_snapshot_is_refused_and_rebuilt(
    golden_home: Home, private_store: tuple[Path, dict[str, str]], vms: VmList
) -> None:
    store, env = private_store
    (snap,) = store.iterdir()
    good = json.loads((snap / "meta.json").read_text())["files"]["state.bin"]["sha256"]
    state = snap / "state.bin"
    state.chmod(0o600)
    with state.open("r+b") as fh:  # one flipped byte, deep in the guest's RAM
        fh.seek(100 * 2**20)
        byte = fh.read(1)
        fh.seek(100 * 2**20)
        fh.write(bytes([byte[0] ^ 0xFF]))
    damaged = snapshot.file_sha256(state)
    warm = vms.up("wx", env=env)
    assert warm["refused"] == {
        "reason": "sha256-mismatch",
        "files": [{"file": "state.bin", "expected": good, "actual": damaged}],
    }
    assert warm["path"] == "cold"
    assert warm["snapshot"]["made"] is True
    assert warm["snapshot"]["key"] == snap.name  # same inputs, rebuilt under the same key
    rebuilt = warm["snapshot"]["files"]["state.bin"]["sha256"]
    assert rebuilt == snapshot.file_sha256(snap / "state.bin") != damaged
    assert sorted(p.name for p in store.iterdir()) == [snap.name]  # no staging or trash left
    assert _exists(golden_home, "wx", "/etc/ssh/ssh_host_ed25519_key") == 0
    again = vms.up("wy", env=env)
    assert (again["path"], again["snapshot"]["files"]["state.bin"]["sha256"]) == ("warm", rebuilt)


def test_changed_inputs_do_not_use_the_snapshot_and_make_their_own(
    golden_home: Home, private_store: tuple[Path, dict[str, str]], vms: VmList
) -> None:
    store, env = private_store
    (old,) = store.iterdir()
    old_meta = (old / "meta.json").read_bytes()
    warm = vms.up("wm", "--memory", "1280", env=env)
    assert (warm["path"], warm["reason"], warm["snapshot"]["made"]) == (
        "cold",
        "no snapshot for these inputs",
        True,
    )
    assert "refused" not in warm
    before = json.loads(old_meta)["inputs"]["machine_args"]
    assert [a for a in warm["inputs"]["machine_args"] if a not in before] == ["1280"]
    assert sorted(p.name for p in store.iterdir()) == sorted([old.name, warm["key"]])
    assert (old / "meta.json").read_bytes() == old_meta  # the other snapshot is untouched


def test_cold_boots_cold_and_leaves_the_snapshots_alone(
    golden_home: Home, private_store: tuple[Path, dict[str, str]], vms: VmList
) -> None:
    store, env = private_store
    before = {p.name: (p / "meta.json").read_bytes() for p in store.iterdir()}
    warm = vms.up("wk", "--cold", env=env)
    assert (warm["path"], warm["reason"]) == ("cold", "--cold: no snapshot used or made")
    assert "snapshot" not in warm and "refused" not in warm
    assert last_receipt(golden_home, "vm-up")["inputs"]["cold"] is True
    assert _exists(golden_home, "wk", "/etc/ssh/ssh_host_ed25519_key") == 0
    # the boot started sshd on a throwaway key (no key generation in the guest); the gate replaced
    # it before the port was forwarded, so the key on disk is the pinned one, not the placeholder
    pinned = inventory.load(golden_home, "wk").host_key or ""
    on_disk = _look(golden_home, "wk")["host_key"]
    assert on_disk == fingerprint(pinned)
    with SshTransport.from_target(inventory.load(golden_home, "wk")) as ssh:
        generated = ssh.run(["systemctl", "show", "-P", "ConditionResult", "avm-ssh-hostkeys.service"])
        # sshd goes first during the boot (nice -10), but what runs over SSH is back at 0
        listener = ssh.run(["sh", "-c", "ps -o ni= -p $(systemctl show -P MainPID ssh.service)"])
        session = ssh.run(["sh", "-c", "ps -o ni= -p $$"])
    assert generated.check().stdout.strip() == "no"  # a key was there: it did not run ssh-keygen
    assert (listener.check().stdout.strip(), session.check().stdout.strip()) == ("-10", "0")
    serial = (Path(lifecycle.load_record(golden_home, "wk").state_dir) / "serial.log").read_text()
    assert "avm-initramfs: throwaway host key installed" in serial
    vms.down("wk")
    assert {p.name: (p / "meta.json").read_bytes() for p in store.iterdir()} == before
