"""The Tier-1 egress boundary in force on the QEMU golden VM (a real kernel, cgroup2), and after
a reboot of that VM (issue 14: "proven in force on every backend").

The same agent repo as tests/test_gateway_nspawn.py (profile ``gw`` lists ``api.example.test``
with a credential); the upstream, the probes and how they show that the table is what refuses
are in tests/plugins/vmgw.py. Here ``avm-boundary.service`` is not skipped: the guest's own
root loads ``inet avm_boundary``, at apply and at every boot, before the agent units.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from controlplane.home import Home
from controlplane.vm.lifecycle import state_dir
from controlplane.vm.qmp import Qmp
from tests.plugins.tier1gw import as_agent, avm, on_host
from tests.plugins.vmgw import (
    CONNECT,
    REFUSED_DIRECT,
    RESOLVE,
    RESOLVER_PORT,
    SEND_UDP,
    SLIRP_HOST,
    boot_id,
    boundary_in_force_on_the_new_boot,
    direct_ip_refused_by_the_table,
    dropped,
    run_as,
    wait_new_boot,
)
from tests.plugins.vms import run_avm

pytestmark = pytest.mark.timeout(900)  # TCG: a VM boot, a promote and a reboot per module


@pytest.fixture(scope="module")
def golden_vm(golden_home: Home) -> Iterator[str]:
    name = "qe" + os.urandom(3).hex()
    up = run_avm(golden_home, "vm", "up", name, "--timeout", "400")
    assert up.returncode == 0, up.stdout + up.stderr
    yield name
    down = run_avm(golden_home, "vm", "down", name)
    assert down.returncode == 0, down.stdout + down.stderr


def test_apply_on_qemu_loads_the_table_on_the_guest_and_its_probes_pass(
    golden_home: Home,
    golden_vm: str,
    vm_applied: dict[str, Any],
    vm_upstream: dict[str, Any],
    gw_repo: dict[str, Any],
) -> None:
    checks = {c["name"]: c for c in vm_applied["checks"]}
    names = ["gateway-in-force", "boundary-table"]
    names += [
        f"egress-{p}:gw" for p in ("listed", "wrong-path", "unlisted-name", "direct-ip", "dns", "metadata")
    ]
    assert {n: checks[n]["ok"] for n in names} == dict.fromkeys(names, True), [checks[n] for n in names]
    probe = vm_applied["observations"]["gateway_probe"]["profiles"]["gw"]
    listener = vm_applied["observations"]["gateway"]["listeners"]["gw"].split(":")[0]
    assert probe["listed"] == {"resolved": [listener], "status": 200, "denied_reason": None}
    assert probe["wrong_path"] == {"status": 403, "denied_reason": "path-not-allowed"}
    print(
        f"receipt probes on qemu: direct {probe['direct']}, dns {probe['dns']}, metadata {probe['metadata']}"
    )
    # not skipped here: the guest's root loaded it (nspawn: ConditionResult=no, loaded from outside)
    boot = on_host(
        golden_home, golden_vm, "systemctl", "show", "-p", "UnitFileState,ConditionResult", "avm-boundary"
    )
    assert dict(line.split("=", 1) for line in boot.splitlines()) == {
        "UnitFileState": "enabled",
        "ConditionResult": "yes",
    }
    # the agent comes back at boot (enabled by the apply), and only after the table is loaded
    enabled = on_host(golden_home, golden_vm, "systemctl", "is-enabled", "agent-gateway@gw", check=False)
    assert enabled.strip() == "enabled"
    shown = on_host(golden_home, golden_vm, "systemctl", "show", "-p", "Requires,After", "agent-gateway@gw")
    props = {k: v.split() for k, v in (line.split("=", 1) for line in shown.splitlines())}
    assert "avm-boundary.service" in props["Requires"] and "avm-boundary.service" in props["After"]
    loaded = on_host(golden_home, golden_vm, "nft", "list", "table", "inet", "avm_boundary")
    uid = on_host(golden_home, golden_vm, "id", "-u", "agent-gw").strip()
    assert f"{uid} : jump profile-gw" in loaded
    assert f"ip daddr {listener} tcp dport {{ 80, 443 }} accept" in loaded  # its names' port and avm.boundary


def test_from_inside_the_unit_only_the_listed_name_gets_out_with_the_injected_credential(
    golden_home: Home,
    golden_vm: str,
    vm_applied: dict[str, Any],
    vm_upstream: dict[str, Any],
    vm_resolver: socket.socket,
    gw_repo: dict[str, Any],
) -> None:
    secret = gw_repo["secret"].decode()
    pid = on_host(golden_home, golden_vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw")
    environ = on_host(golden_home, golden_vm, "cat", f"/proc/{pid.strip()}/environ")
    assert secret not in environ and "SSL_CERT_FILE=/etc/avm/boundary/egress-ca.pem" in environ
    seen_before = len(vm_upstream["log"].read_text().splitlines())
    listed = as_agent(golden_home, golden_vm, "/v1/messages", forged="agent-made-this-up", cgroup=True)
    wrong = as_agent(golden_home, golden_vm, "/v2/other", cgroup=True)
    seen = [json.loads(line) for line in vm_upstream["log"].read_text().splitlines()[seen_before:]]
    assert [r["path"] for r in seen] == ["/v1/messages"]  # the denied path never reached it
    assert [v for k, v in seen[0]["headers"] if k == "x-api-key"] == [secret]
    unlisted = {
        "host": on_host(golden_home, golden_vm, "python3", "-c", RESOLVE, "outside.example.test").strip(),
        "unit": run_as(golden_home, golden_vm, "unit", RESOLVE, "outside.example.test"),
    }
    direct = direct_ip_refused_by_the_table(golden_home, golden_vm, vm_upstream)
    # DNS to a resolver outside: one datagram each; only root's arrives, the agent's never left
    to = (SLIRP_HOST, str(RESOLVER_PORT))
    before = dropped(golden_home, golden_vm)
    dns: dict[str, Any] = {
        "unit": run_as(golden_home, golden_vm, "unit", SEND_UDP, *to, "from-agent"),
        "dropped": None,
        "root": run_as(golden_home, golden_vm, "root", SEND_UDP, *to, "from-root"),
    }
    dns["dropped"] = dropped(golden_home, golden_vm) - before
    dns["received"] = vm_resolver.recvfrom(512)[0].decode()
    vm_resolver.setblocking(False)
    try:
        dns["more"] = vm_resolver.recvfrom(512)[0].decode()
    except BlockingIOError:
        dns["more"] = None
    finally:
        vm_resolver.settimeout(30)
    metadata = run_as(golden_home, golden_vm, "unit", CONNECT, "169.254.169.254", "80", "3")
    results = {
        "listed": (listed["status"], listed["reason"]),
        "wrong path": (wrong["status"], wrong["reason"]),
        "unlisted": unlisted,
        "direct": direct,
        "dns": dns,
        "metadata": metadata,
    }
    print("probes from inside agent-gateway@gw on qemu:", json.dumps(results, sort_keys=True))
    assert results == {
        "listed": (200, None),
        "wrong path": (403, "path-not-allowed"),
        "unlisted": {"host": f"['{SLIRP_HOST}']", "unit": "error: [Errno -2] Name or service not known"},
        "direct": REFUSED_DIRECT,
        "dns": {"unit": "errno 1", "dropped": 1, "root": "sent", "received": "from-root", "more": None},
        "metadata": "timeout",
    }


def reboot(home: Home, vm: str, timeout_s: float = 480) -> float:
    """Reboot the guest for real (its own ``systemctl reboot``) and wait for SSH on the new boot.
    The VM's QEMU runs with ``-no-reboot`` (a guest reset ends it); QMP ``set-action`` makes
    this one reset instead, so the same process, disk and SSH forward carry on. The guest's
    serial console says when it went down and came back, so SSH is only tried after that."""
    old = boot_id(home, vm)
    serial = state_dir(home, vm) / "serial.log"
    seen = len(serial.read_bytes())
    with Qmp(state_dir(home, vm) / "qmp.sock") as qmp:
        qmp.execute("set-action", reboot="reset")
    t0 = time.monotonic()
    on_host(home, vm, "systemctl", "--no-block", "reboot")
    while True:
        assert time.monotonic() - t0 < timeout_s, f"the guest did not reboot within {timeout_s} s"
        after = serial.read_bytes()[seen:]
        restarted = after.find(b"reboot: Restarting system")
        if restarted >= 0 and b" login:" in after[restarted:]:
            break
        time.sleep(1)
    wait_new_boot(home, vm, old, t0, timeout_s)
    return time.monotonic() - t0


def test_after_a_reboot_the_table_is_loaded_at_boot_before_the_agent_and_still_refuses(
    golden_home: Home, golden_vm: str, vm_applied: dict[str, Any], vm_upstream: dict[str, Any]
) -> None:
    seconds = reboot(golden_home, golden_vm)  # nothing but SSH from here to the status at the end
    seen = boundary_in_force_on_the_new_boot(golden_home, golden_vm, vm_upstream)
    print(f"qemu guest reboot to agent-gateway@gw active: {seconds:.1f} s; after boot: {seen}")
    rc, doc = avm(golden_home, "status", "--target", golden_vm)
    assert rc == 0, doc
    assert doc["findings"] == []
