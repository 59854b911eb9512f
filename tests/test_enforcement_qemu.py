"""Controls observed in force on the QEMU golden VM (cgroup2): one boot, several assertions.

There the unit's ``IPAddressDeny=`` is enforced by cgroup-BPF and the limits by the kernel's
cgroup2 files, so the same probe that finds them missing on nspawn must find them in force.
"""

from __future__ import annotations

from controlplane.home import Home
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from tests.plugins.agentrepo import AgentRepo
from tests.plugins.vms import run_avm_json as avm

TRANSIENT = ("systemd-run", "--quiet", "--wait", "--pipe", "--unit=avm-oomtest")
ALLOC_300M = "b = b'x' * (300 * 2**20); print(len(b))"  # every page written, not just reserved
# the web profile's cgroup on the guest's cgroup2 (systemd escapes "-" in the slice name)
UNIT_CGROUP = "/sys/fs/cgroup/system.slice/system-agent\\x2dgateway.slice/agent-gateway@web.service"


def test_qemu_probe_observes_the_deny_and_the_limits_in_force(
    golden_home: Home, agent_repo: AgentRepo
) -> None:
    rc, up = avm(golden_home, "vm", "up", "qenf", "--timeout", "400")
    assert rc == 0, up
    try:
        rc, doc = avm(
            golden_home,
            "promote",
            "--repo",
            str(agent_repo.path),
            "--commit",
            agent_repo.commits["v1"],
            "--target",
            "qenf",
            "--apply",
        )
        assert rc == 0, doc
        pred = avm(golden_home, "receipts", "show", doc["receipts"]["apply"])[1]["statement"]["predicate"]
        checks = {c["name"]: c for c in pred["checks"]}
        for profile in ("canary", "web", "batch"):
            denied = checks[f"egress-denied:{profile}"]
            assert denied["ok"] is True, denied
            # cgroup-BPF drops the SYN (measured: the connect times out), where nspawn's
            # host-side nftables reject answers at once
            assert "dropped (timeout)" in denied["detail"]
            assert checks[f"limits:{profile}"]["ok"] is True, checks[f"limits:{profile}"]
        assert "egress-rules:web" not in checks  # no host-side rules: the unit property is the mechanism
        web = pred["result"]["controls"]["web"]["limit_readings"]
        assert web["memory"] == {
            "configured": "134217728",
            "kernel": "134217728",
            "file": UNIT_CGROUP + "/memory.max",
            "status": "enforced",
        }
        assert (web["tasks"]["kernel"], web["tasks"]["status"]) == ("32", "enforced")
        assert (web["cpu"]["kernel"], web["cpu"]["status"]) == ("25000 100000", "enforced")
        # and the verdict is true: here a process past its memory limit is killed
        with SshTransport.from_target(inventory.load(golden_home, "qenf")) as ssh:
            ssh.run([*TRANSIENT, "-p", "MemoryMax=50M", "python3", "-c", ALLOC_300M], timeout=120)
            result = ssh.run(
                ["systemctl", "show", "-p", "Result", "--value", "avm-oomtest.service"], timeout=30
            )
            ssh.run(["systemctl", "reset-failed", "avm-oomtest.service"], timeout=30)
        assert result.stdout.strip() == "oom-kill"
        rc, status = avm(golden_home, "status", "--target", "qenf")
        assert rc == 0, status
        assert {p: (c["egress"], c["limits"]) for p, c in status["controls"].items()} == {
            "canary": ("denied", "enforced"),
            "web": ("denied", "enforced"),
            "batch": ("denied", "enforced"),
        }
    finally:
        rc, down = avm(golden_home, "vm", "down", "qenf")
    assert rc == 0, down
