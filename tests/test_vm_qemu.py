"""The qemu golden VM (TCG here: /dev/kvm is PVM-only): boot to SSH, per-VM key, kill -9, teardown."""

from __future__ import annotations

import json
import os
import signal
import time

from controlplane.home import Home
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from controlplane.vm import lifecycle, procs
from tests.plugins.vms import run_avm


def test_qemu_vm_boots_runs_systemd_and_tears_down_to_nothing(golden_home: Home) -> None:
    up = run_avm(golden_home, "--json", "vm", "up", "qemu1", "--timeout", "400")
    assert up.returncode == 0, up.stderr
    record = json.loads(up.stdout)
    assert record["accelerator"] in ("kvm", "tcg")
    try:
        state = run_avm(golden_home, "vm", "ssh", "qemu1", "--", "systemctl", "is-system-running", "--wait")
        failed = run_avm(
            golden_home, "vm", "ssh", "qemu1", "--", "systemctl", "--failed", "--no-legend"
        ).stdout
        assert state.stdout.strip() == "running", f"{state.stdout} failed units: {failed}"
        with SshTransport.from_target(inventory.load(golden_home, "qemu1")) as ssh:
            uname = ssh.run(["uname", "-r"], timeout=60).check().stdout.strip()
            key = (
                ssh.run(["ssh-keygen", "-lf", "/etc/ssh/ssh_host_ed25519_key.pub"], timeout=60).check().stdout
            )
        assert uname.endswith("-cloud-amd64")
        assert record["host_key_fingerprint"] in key  # the injected key, not one from the image
    finally:
        vm = lifecycle.load_record(golden_home, "qemu1")
        # kill -9 the VM: status must say dead, and down must still clean everything up
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while procs.alive(vm.pid, vm.marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        status = json.loads(run_avm(golden_home, "--json", "vm", "status", "qemu1").stdout)
        assert status["vms"][0]["status"] == "dead"
        down = run_avm(golden_home, "--json", "vm", "down", "qemu1")
        assert down.returncode == 0, down.stdout + down.stderr
    checks = json.loads(down.stdout)["checks"]
    assert checks and all(c["ok"] for c in checks), checks
    assert not procs.pids_with_marker(vm.marker)
    assert not lifecycle.state_dir(golden_home, "qemu1").exists()
