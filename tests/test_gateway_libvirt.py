"""The golden VM under a running libvirtd (nested virtualization, down leaves no domain), the
Tier-1 egress boundary in force on it, and after it stops and starts.

The same parts and probes as tests/test_gateway_qemu.py (tests/plugins/vmgw.py): a
golden VM under a running libvirtd (``qemu:///system``, TCG, slirp NIC through
``<qemu:commandline>``, so the guest reaches the host's loopback at 10.0.2.2 as there). The
domain's ``on_reboot`` is ``destroy``, so the guest's own ``systemctl reboot`` stops the domain
and libvirt starts it again (``virDomainCreate``): the same disk, a new boot, no avm command.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest

from controlplane.home import Home
from controlplane.vm.lifecycle import state_dir
from tests.plugins.tier1gw import as_agent, avm, on_host
from tests.plugins.vmgw import (
    REFUSED_DIRECT,
    boot_id,
    boundary_in_force_on_the_new_boot,
    direct_ip_refused_by_the_table,
    wait_new_boot,
)
from tests.plugins.vms import run_avm

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("libvirt_extra")]
URI = {"AVM_LIBVIRT_URI": "qemu:///system"}


@pytest.fixture(scope="module")
def golden_vm(golden_home: Home, libvirtd: None) -> Iterator[str]:
    name = "qe" + os.urandom(3).hex()
    up = run_avm(golden_home, "vm", "up", name, "--backend", "libvirt", "--timeout", "420", env=URI)
    assert up.returncode == 0, up.stdout + up.stderr
    yield name
    import libvirt

    marker = ET.parse(state_dir(golden_home, name) / "domain.xml").findtext("name")  # noqa: S314 - avm's own file
    down = run_avm(golden_home, "vm", "down", name, env=URI)
    assert down.returncode == 0, down.stdout + down.stderr
    conn = libvirt.open(URI["AVM_LIBVIRT_URI"])
    try:  # down leaves no domain of this VM behind
        assert marker not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def test_the_golden_vm_under_libvirtd_sees_nested_virtualization(golden_home: Home, golden_vm: str) -> None:
    """A real SSH login into the domain libvirtd runs; its CPU has svm or vmx (nested virt)."""
    out = on_host(golden_home, golden_vm, "grep", "-c", "-w", "-E", "svm|vmx", "/proc/cpuinfo")
    assert int(out) >= 1


def domain(home: Home, vm: str) -> Any:
    import libvirt

    name = ET.parse(state_dir(home, vm) / "domain.xml").findtext("name")  # noqa: S314 - avm's own file
    return libvirt.open(URI["AVM_LIBVIRT_URI"]).lookupByName(name)


def test_apply_under_libvirt_loads_the_table_on_the_guest_and_the_boundary_holds(
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
    boot = on_host(
        golden_home, golden_vm, "systemctl", "show", "-p", "ConditionResult", "--value", "avm-boundary"
    )
    assert boot.strip() == "yes"  # not a container: the guest's root loaded it
    before = len(vm_upstream["log"].read_text().splitlines())
    got = as_agent(golden_home, golden_vm, "/v1/messages", cgroup=True)
    assert (got["status"], got["reason"]) == (200, None)
    seen = [json.loads(line) for line in vm_upstream["log"].read_text().splitlines()[before:]]
    assert [[v for k, v in r["headers"] if k == "x-api-key"] for r in seen] == [[gw_repo["secret"].decode()]]
    assert direct_ip_refused_by_the_table(golden_home, golden_vm, vm_upstream) == REFUSED_DIRECT


def test_after_a_stop_and_start_the_table_is_loaded_at_boot_before_the_agent(
    golden_home: Home, golden_vm: str, vm_applied: dict[str, Any], vm_upstream: dict[str, Any]
) -> None:
    import libvirt

    old = boot_id(golden_home, golden_vm)
    dom = domain(golden_home, golden_vm)
    t0 = time.monotonic()
    on_host(golden_home, golden_vm, "systemctl", "--no-block", "reboot")
    while dom.state()[0] != libvirt.VIR_DOMAIN_SHUTOFF:  # on_reboot=destroy
        assert time.monotonic() - t0 < 300, f"domain still in state {dom.state()}"
        time.sleep(1)
    dom.create()
    wait_new_boot(golden_home, golden_vm, old, t0, 600)
    seen = boundary_in_force_on_the_new_boot(golden_home, golden_vm, vm_upstream)
    print(f"libvirt stop/start to agent-gateway@gw active: {time.monotonic() - t0:.1f} s; after boot: {seen}")
    rc, doc = avm(golden_home, "status", "--target", golden_vm)
    assert rc == 0, doc
    assert doc["findings"] == []
