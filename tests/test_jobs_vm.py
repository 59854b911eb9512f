"""``avm job run --target VM``: the same job code path, with QEMU run on a golden VM through SSH.

The golden VM is the nspawn-booted golden rootfs (real systemd, real sshd, its own qemu-system-x86
and busybox-static); the kernel and initramfs are uploaded with the transport's ``put``, the result
comes back with ``get``, and the remote work dir and QEMU process are checked gone.
"""

from __future__ import annotations

import json

import pytest

from controlplane.home import Home
from tests.plugins.jobimages import JobEnv, needs_job_tools, prepare
from tests.plugins.vms import run_avm


@pytest.fixture(scope="module")
def vm_jobenv(golden_home: Home, tmp_path_factory: pytest.TempPathFactory) -> JobEnv:
    needs_job_tools()
    return prepare(golden_home, tmp_path_factory.mktemp("vmjobs"))


def test_job_runs_on_the_golden_vm_through_the_transport(vm_jobenv: JobEnv, nspawn_vm: str) -> None:
    spec = vm_jobenv.spec("vm-exit", id="on-vm", command=["sh", "-c", "echo on-the-vm; exit 3"])
    out = run_avm(vm_jobenv.home, "--json", "job", "run", str(spec), "--target", nspawn_vm, timeout=300)
    assert out.returncode == 4, (out.stdout, out.stderr)  # the job failed; 3 would mean "refused"
    doc = json.loads(out.stdout)
    assert doc["stdout"] == "on-the-vm\n" and doc["status"] == "failed" and doc["exit_code"] == 3
    checks = {c["name"]: c["ok"] for c in doc["checks"]}
    assert checks["remote-qemu-process-gone"] and checks["remote-workdir-removed"], doc["checks"]
    assert all(checks.values()), doc["checks"]
