"""The nspawn golden VM: real systemd and sshd, per-VM keys, verified teardown, kill -9 handling."""

from __future__ import annotations

import json
import os
import signal
import time

from controlplane.evidence.receipt import open_receipt
from controlplane.home import Home
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from controlplane.vm import cgroup, lifecycle, procs
from tests.plugins.vms import needs_root_and_nspawn, run_avm


def last_receipt(home: Home, kind: str) -> dict[str, object]:
    out = json.loads(run_avm(home, "--json", "receipts", "list").stdout)["receipts"]
    seq = [r for r in out if r["kind"] == kind][-1]["seq"]
    doc: dict[str, object] = json.loads(run_avm(home, "--json", "receipts", "show", str(seq)).stdout)
    return doc


def test_up_gives_a_running_systemd_reachable_over_pinned_ssh(golden_home: Home, nspawn_vm: str) -> None:
    out = run_avm(golden_home, "vm", "ssh", nspawn_vm, "--", "systemctl", "is-system-running")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "running", run_avm(
        golden_home, "vm", "ssh", nspawn_vm, "--", "systemctl", "--failed"
    ).stdout
    # a paramiko command over the pinned key, straight through the transport
    with SshTransport.from_target(inventory.load(golden_home, nspawn_vm)) as ssh:
        result = ssh.run(["hostname"], timeout=30)
    assert result.rc == 0 and result.stdout.strip() == f"avm-{nspawn_vm}"
    receipt = last_receipt(golden_home, "vm-up")["statement"]
    assert isinstance(receipt, dict)
    assert receipt["predicate"]["observations"]["accelerator"] == "container"
    assert receipt["predicate"]["result"]["boot_to_ssh_s"] > 0


def test_each_vm_has_its_own_host_key_not_from_the_image(golden_home: Home, nspawn_vm: str) -> None:
    out = run_avm(
        golden_home, "vm", "ssh", nspawn_vm, "--", "ssh-keygen", "-lf", "/etc/ssh/ssh_host_ed25519_key.pub"
    )
    pinned = inventory.load(golden_home, nspawn_vm).host_key or ""
    from controlplane.vm.seed import fingerprint

    assert fingerprint(pinned) in out.stdout
    image_keys = run_avm(
        golden_home, "vm", "ssh", nspawn_vm, "--", "sh", "-c", "ls /etc/ssh/ | grep -c host_ || true"
    )
    assert image_keys.stdout.strip() == "2"  # only the injected ed25519 pair


def test_bad_input_is_refused_before_anything_starts(golden_home: Home) -> None:
    before = (
        sorted(os.listdir(lifecycle.vms_dir(golden_home))) if lifecycle.vms_dir(golden_home).exists() else []
    )
    bad_name = run_avm(golden_home, "vm", "up", "../etc", "--backend", "nspawn")
    assert bad_name.returncode == 64 and "error[" in bad_name.stderr
    taken = procs.free_port()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", taken))
        sock.listen()
        busy = run_avm(golden_home, "vm", "up", "porttest", "--backend", "qemu", "--ssh-port", str(taken))
    assert busy.returncode == 64 and "error[port-taken]" in busy.stderr
    # an nspawn VM has its own address and port 22: a port option would be silently ignored
    port = run_avm(golden_home, "vm", "up", "porttest", "--backend", "nspawn", "--ssh-port", "2222")
    assert port.returncode == 64 and "error[ssh-port-not-applicable]" in port.stderr
    after = (
        sorted(os.listdir(lifecycle.vms_dir(golden_home))) if lifecycle.vms_dir(golden_home).exists() else []
    )
    assert before == after


def test_kill_9_is_reported_dead_and_down_still_cleans_up(golden_home: Home) -> None:
    needs_root_and_nspawn()
    up = run_avm(golden_home, "vm", "up", "victim", "--backend", "nspawn", "--timeout", "120")
    assert up.returncode == 0, up.stderr
    record = lifecycle.load_record(golden_home, "victim")
    assert record.pid is not None
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while procs.alive(record.pid, record.marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    status = json.loads(run_avm(golden_home, "--json", "vm", "status", "victim").stdout)
    assert status["vms"][0]["status"] == "dead"
    # the container's systemd and sshd survive a kill -9 of nspawn: they are still in its cgroup
    assert cgroup.members(record.marker), "expected orphaned container processes to clean up"
    down = run_avm(golden_home, "--json", "vm", "down", "victim")
    assert down.returncode == 0, down.stdout + down.stderr
    checks = {c["name"]: c["ok"] for c in json.loads(down.stdout)["checks"]}
    assert all(checks.values()) and "container-processes-killed" in checks
    assert not cgroup.members(record.marker)
    assert not procs.pids_with_marker(record.marker)
    assert not lifecycle.state_dir(golden_home, "victim").exists()
    receipt = last_receipt(golden_home, "vm-down")["statement"]
    assert isinstance(receipt, dict)
    assert receipt["predicate"]["observations"]["status_before"] == "dead"


def test_down_of_unknown_vm_is_a_clear_error(golden_home: Home) -> None:
    out = run_avm(golden_home, "vm", "down", "nosuchvm")
    assert out.returncode == 1 and "error[vm-not-found]" in out.stderr


def test_receipts_of_the_vm_lifecycle_verify(golden_home: Home, nspawn_vm: str) -> None:
    out = run_avm(golden_home, "receipts", "verify")
    assert out.returncode == 0, out.stderr
    kinds = [
        open_receipt(p.read_bytes())[2].predicate.kind for p in sorted(golden_home.receipts.glob("0*.json"))
    ]
    assert "vm-up" in kinds
