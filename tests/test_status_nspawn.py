"""``avm status`` sees what systemd and the release really run, on a real golden host (nspawn).

Each test starts from v2 promoted and in sync, breaks the host the way an attacker or a careless
operator would, checks that status reports it (exit 2, where / expected / actual) and that
promote refuses to build on it, then repairs the host and checks status is back to 0. Tests do
not depend on each other's order.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator

import pytest

from controlplane.home import Home
from tests.plugins.agentrepo import AgentRepo
from tests.plugins.vms import run_avm
from tests.test_promote_nspawn import PROFILES, healthz, on_host, promote, status

UNIT_DIR = "/etc/systemd/system"


@pytest.fixture
def in_sync(golden_home: Home, agent_repo: AgentRepo, nspawn_vm: str) -> Iterator[str]:
    """The module's VM with v2 applied and status 0; each test leaves it that way again."""
    out = promote(golden_home, agent_repo, agent_repo.commits["v2"], nspawn_vm, "--apply")
    assert out.returncode == 0, out.stdout + out.stderr
    assert status(golden_home, nspawn_vm)[0] == 0
    yield nspawn_vm
    assert status(golden_home, nspawn_vm)[0] == 0


# (shell that breaks the host, the finding's where, the finding's actual or None, shell that repairs it)
Case = tuple[str, str, str | None, str]

RELOAD_RESTART = "systemctl daemon-reload && systemctl restart agent-gateway@web.service"
UNIT_CASES: dict[str, Case] = {
    "template drop-in User=root": (
        f"mkdir -p {UNIT_DIR}/agent-gateway@.service.d && "
        f"printf '[Service]\\nUser=root\\n' > {UNIT_DIR}/agent-gateway@.service.d/override.conf"
        f" && {RELOAD_RESTART}",
        "agent-gateway@web.service main process Uid",
        "0",
        f"rm -r {UNIT_DIR}/agent-gateway@.service.d && {RELOAD_RESTART}",
    ),
    "profile drop-in unconfines": (
        f"printf '[Service]\\nProtectSystem=no\\nNoNewPrivileges=no\\nIPAddressDeny=\\n' "
        f"> {UNIT_DIR}/agent-gateway@web.service.d/zz-local.conf && {RELOAD_RESTART}",
        "agent-gateway@web.service ProtectSystem",
        "no",
        f"rm {UNIT_DIR}/agent-gateway@web.service.d/zz-local.conf && {RELOAD_RESTART}",
    ),
    "drop-in under /run": (
        "mkdir -p /run/systemd/system/agent-gateway@web.service.d && "
        "printf '[Service]\\nNoNewPrivileges=no\\n'"
        " > /run/systemd/system/agent-gateway@web.service.d/r.conf && " + RELOAD_RESTART,
        "/run/systemd/system/agent-gateway@web.service.d/r.conf",
        None,
        f"rm -r /run/systemd/system/agent-gateway@web.service.d && {RELOAD_RESTART}",
    ),
    "full instance override": (
        f"sed 's/^User=.*/User=root/' {UNIT_DIR}/agent-gateway@.service"
        f" > {UNIT_DIR}/agent-gateway@web.service && {RELOAD_RESTART}",
        f"{UNIT_DIR}/agent-gateway@web.service",
        None,
        f"rm {UNIT_DIR}/agent-gateway@web.service && {RELOAD_RESTART}",
    ),
    "drop-in written, not yet reloaded": (
        f"printf '[Service]\\nUser=root\\n' > {UNIT_DIR}/agent-gateway@web.service.d/later.conf",
        "agent-gateway@web.service",
        "NeedDaemonReload=yes",
        f"rm {UNIT_DIR}/agent-gateway@web.service.d/later.conf && systemctl daemon-reload",
    ),
}


def _release(repo: AgentRepo) -> str:
    return f"/opt/agent/releases/{repo.commits['v2']}"


RELEASE_CASES: dict[str, Callable[[str], Case]] = {
    "symlinked __pycache__ directory": lambda rel: (
        f"mkdir -p /root/elsewhere && chmod u+w {rel}"
        f" && ln -s /root/elsewhere {rel}/__pycache__ && chmod 0555 {rel}",
        f"{rel}/__pycache__",
        "symlink:/root/elsewhere",
        f"chmod u+w {rel} && rm {rel}/__pycache__ && chmod 0555 {rel}",
    ),
    "file made 0666": lambda rel: (
        f"chmod 0666 {rel}/agent.py",
        f"{rel}/agent.py",
        "0666",
        f"chmod 0444 {rel}/agent.py",
    ),
    "file given to the profile's user": lambda rel: (
        f"chown agent-web {rel}/agent.py",
        f"{rel}/agent.py",
        None,
        f"chown root {rel}/agent.py",
    ),
    "release directory made 0777": lambda rel: (
        f"chmod 0777 {rel}",
        rel,
        "0777",
        f"chmod 0555 {rel}",
    ),
}


def _drift(home: Home, vm: str, where: str, actual: str | None) -> dict[str, object]:
    rc, doc = status(home, vm)
    assert rc == 2, doc
    rows: dict[str, dict[str, object]] = {f["where"]: f for f in doc["findings"]}
    assert where in rows, doc["findings"]
    if actual is not None:
        assert rows[where]["actual"] == actual, rows[where]
    return rows[where]


@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_unit_overrides_are_drift_and_promote_refuses_them(
    case: str, golden_home: Home, agent_repo: AgentRepo, in_sync: str
) -> None:
    breaks, where, actual, repair = UNIT_CASES[case]
    on_host(golden_home, in_sync, "sh", "-c", breaks)
    try:
        _drift(golden_home, in_sync, where, actual)
        # promote refuses too: a daemon-reload would load the override, so it is never run
        refused = promote(golden_home, agent_repo, agent_repo.commits["v2"], in_sync, "--apply")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert json.loads(refused.stdout)["error"]["code"] == "unit-foreign-files"
    finally:
        on_host(golden_home, in_sync, "sh", "-c", repair)


def test_a_process_left_running_as_root_is_drift_until_promote_restarts_it(
    golden_home: Home, agent_repo: AgentRepo, in_sync: str
) -> None:
    breaks, _, _, _ = UNIT_CASES["template drop-in User=root"]
    on_host(golden_home, in_sync, "sh", "-c", breaks)
    # the override is removed and systemd reloaded, but the process that started as root runs on
    on_host(
        golden_home,
        in_sync,
        "sh",
        "-c",
        f"rm -r {UNIT_DIR}/agent-gateway@.service.d && systemctl daemon-reload",
    )
    _drift(golden_home, in_sync, "agent-gateway@web.service main process Uid", "0")
    fixed = promote(golden_home, agent_repo, agent_repo.commits["v2"], in_sync, "--apply")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert [(a["kind"], a["target"]) for a in json.loads(fixed.stdout)["actions"]] == [("restart", "web")]


@pytest.mark.parametrize("case", list(RELEASE_CASES))
def test_every_release_entry_is_checked_and_promote_refuses_a_tampered_one(
    case: str, golden_home: Home, agent_repo: AgentRepo, in_sync: str
) -> None:
    breaks, where, actual, repair = RELEASE_CASES[case](_release(agent_repo))
    on_host(golden_home, in_sync, "sh", "-c", breaks)
    try:
        finding = _drift(golden_home, in_sync, where, actual)
        if case == "file given to the profile's user":
            assert "agent-web" in str(finding["what"]), finding
        refused = promote(golden_home, agent_repo, agent_repo.commits["v2"], in_sync, "--apply")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert json.loads(refused.stdout)["error"]["code"] == "release-tampered"
    finally:
        on_host(golden_home, in_sync, "sh", "-c", repair)


def test_the_apply_receipt_records_the_effective_unit_it_observed(golden_home: Home, in_sync: str) -> None:
    doc = json.loads(run_avm(golden_home, "--json", "receipts", "list").stdout)
    seq = next(r["seq"] for r in reversed(doc["receipts"]) if r["kind"] == "apply" and r["status"] == "ok")
    predicate = json.loads(run_avm(golden_home, "--json", "receipts", "show", str(seq)).stdout)["statement"][
        "predicate"
    ]
    web = next(p for p in predicate["result"]["host_state"]["profiles"] if p["name"] == "web")
    assert web["unit"]["User"] == "agent-web" and web["unit"]["NoNewPrivileges"] == "yes"
    assert web["unit"]["credentials"] == "LoadCredential=API_TOKEN:/etc/agent/credentials/web/API_TOKEN"
    assert web["unit"]["SystemCallFilter"].startswith("sha256:")


def _failing_flip(profile: str) -> str:
    """Make the `current` flip of one profile fail on the host: its temp link path is a directory."""
    return f"mkdir -p /opt/agent/profiles/{profile}/current.new/x"


def test_a_failure_mid_apply_puts_back_every_profile_it_changed(
    golden_home: Home, agent_repo: AgentRepo, in_sync: str
) -> None:
    on_host(golden_home, in_sync, "sh", "-c", _failing_flip("batch"))
    try:
        out = promote(golden_home, agent_repo, agent_repo.commits["v1"], in_sync, "--apply")
    finally:
        on_host(golden_home, in_sync, "rm", "-r", "/opt/agent/profiles/batch/current.new")
    assert out.returncode == 1, out.stdout + out.stderr
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "apply-failed"
    # the canary and web were flipped to v1 and restarted before batch failed: all back on v2
    assert error["details"]["changed"] == ["canary", "web", "batch"]
    assert sorted(error["details"]["undone"]) == ["batch", "canary", "web"]
    for profile in PROFILES:
        assert healthz(golden_home, in_sync, profile)["commit"] == agent_repo.commits["v2"]
    receipts = json.loads(run_avm(golden_home, "--json", "receipts", "list", "--last", "1").stdout)[
        "receipts"
    ]
    shown = json.loads(run_avm(golden_home, "--json", "receipts", "show", str(receipts[-1]["seq"])).stdout)
    predicate = shown["statement"]["predicate"]
    assert (predicate["kind"], predicate["status"], predicate["error"]["code"]) == (
        "apply",
        "failed",
        "apply-failed",
    )
    assert predicate["result"]["undone"] == error["details"]["undone"]
    # status compares with the last good apply and says the newest one failed
    rc, doc = status(golden_home, in_sync)
    assert rc == 0 and doc["baseline"] == "apply"
    assert "failed" in doc["notes"][0]


def test_a_host_whose_only_apply_failed_is_still_inspectable(
    golden_home: Home, agent_repo: AgentRepo
) -> None:
    vm = "f" + secrets.token_hex(4)
    up = run_avm(golden_home, "vm", "up", vm, "--backend", "nspawn", "--timeout", "120")
    assert up.returncode == 0, up.stderr
    try:
        on_host(golden_home, vm, "sh", "-c", _failing_flip("web"))
        out = promote(golden_home, agent_repo, agent_repo.commits["v2"], vm, "--apply")
        assert out.returncode == 1, out.stdout + out.stderr
        assert json.loads(out.stdout)["error"]["code"] == "apply-failed"
        # undone exactly: no link, no running unit, no user left behind
        left = on_host(
            golden_home,
            vm,
            "sh",
            "-c",
            "ls /opt/agent/profiles/*/current 2>/dev/null; getent passwd | grep -c ^agent- || true",
        )
        assert left.strip() == "0", left
        rc, doc = status(golden_home, vm)
        assert (rc, doc["baseline"], doc["findings"]) == (0, "rollback-target", []), doc
        assert "ever succeeded" in doc["notes"][0]
        # and it still sees what is on the host now
        on_host(
            golden_home,
            vm,
            "sh",
            "-c",
            f"mkdir -p /opt/agent/profiles/canary"
            f" && ln -s {_release(agent_repo)} /opt/agent/profiles/canary/current",
        )
        rc, doc = status(golden_home, vm)
        assert rc == 2
        assert [(f["where"], f["expected"], f["actual"]) for f in doc["findings"]] == [
            ("/opt/agent/profiles/canary/current", None, _release(agent_repo))
        ]
    finally:
        down = run_avm(golden_home, "vm", "down", vm)
        assert down.returncode == 0, down.stdout + down.stderr
