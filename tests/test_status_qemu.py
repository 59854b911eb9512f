"""The status checks hold on the QEMU golden VM too (a real kernel, cgroup2): one boot, promote
v2, then a drop-in that makes the agent root and a symlinked directory in the release."""

from __future__ import annotations

import json
import secrets

from controlplane.home import Home
from tests.plugins.agentrepo import AgentRepo
from tests.plugins.vms import run_avm
from tests.test_promote_nspawn import on_host, promote, status
from tests.test_status_nspawn import RELEASE_CASES, UNIT_CASES


def test_drop_in_and_symlinked_directory_are_drift_on_qemu(golden_home: Home, agent_repo: AgentRepo) -> None:
    vm = "q" + secrets.token_hex(4)
    up = run_avm(golden_home, "vm", "up", vm, "--timeout", "400")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        out = promote(golden_home, agent_repo, agent_repo.commits["v2"], vm, "--apply")
        assert out.returncode == 0, out.stdout + out.stderr
        assert status(golden_home, vm)[0] == 0
        release = f"/opt/agent/releases/{agent_repo.commits['v2']}"
        for breaks, where, actual, repair in (
            UNIT_CASES["template drop-in User=root"],
            RELEASE_CASES["symlinked __pycache__ directory"](release),
        ):
            on_host(golden_home, vm, "sh", "-c", breaks)
            rc, doc = status(golden_home, vm)
            rows = {f["where"]: f["actual"] for f in doc["findings"]}
            assert (rc, rows.get(where)) == (2, actual), doc
            refused = promote(golden_home, agent_repo, agent_repo.commits["v2"], vm, "--apply")
            assert refused.returncode == 3, refused.stdout + refused.stderr
            on_host(golden_home, vm, "sh", "-c", repair)
            rc, doc = status(golden_home, vm)
            assert rc == 0, doc
        receipt = json.loads(run_avm(golden_home, "--json", "receipts", "verify").stdout)
        assert receipt["ok"] is True, receipt
    finally:
        down = run_avm(golden_home, "vm", "down", vm)
        assert down.returncode == 0, down.stdout + down.stderr
