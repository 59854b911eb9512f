"""Agent permission requests on a real nspawn golden host (issue 15 part 4), in order, one VM.

The profile lists ``api.example.test`` ``/v1/*`` (tests/plugins/tier1gw.py). The agent, from
inside its running unit, is refused ``/v2/things`` (the denial says how to ask), reads its
policy at ``http://avm.boundary/policy``, and files a request at ``/requests``. The human side
collects (``avm egress requests``: hostile records listed as invalid), a forged approval (the
agent's own key, an approval written on the host) and an expired one are refused with the host
unchanged, a generated test approver approves, ``avm egress apply --apply`` hot-reloads with
the agent's MainPID unchanged, and the agent now reaches ``/v2/things``. A denial is recorded.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane.governance import approvals
from controlplane.home import Home
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from tests.plugins.tier1gw import (
    agent,
    agent_python,
    ask,
    avm,
    in_force,
    main_pid,
    newest,
    on_host,
    promote,
    receipt_of,
)
from tests.plugins.vms import run_avm

STORE = "/var/lib/avm-requests"
WANT = {
    "destination": "api.example.test",
    "methods": ["GET"],
    "paths": ["/v2/*"],
    "reason": "read the v2 API",
}


@pytest.fixture(scope="module")
def applied(
    golden_home: Home, gw_repo: dict[str, Any], nspawn_vm: str, gw_upstream: dict[str, Any]
) -> dict[str, Any]:
    rc, doc = promote(golden_home, gw_repo, "good", nspawn_vm, "--apply")
    assert rc == 0, doc
    return receipt_of(golden_home, doc["receipts"]["apply"])


@pytest.fixture(scope="module")
def filed(golden_home: Home, nspawn_vm: str, applied: dict[str, Any]) -> dict[str, str]:
    """The agent's requests: a good one (with a forged identity header), a malformed one, one
    carrying an approval the agent signed with its own key; and a request file root wrote."""
    good = ask(golden_home, nspawn_vm, json.dumps(WANT), **{"x-avm-identity": "profile:someone-else"})
    assert good["status"] == 202, good
    bad = ask(golden_home, nspawn_vm, "{not json")
    assert bad["status"] == 202, bad
    forged = {"id": "rq-ffffffffffffffff", "identity": "profile:gw", "received": "2026-12-01T00:00:00Z"}
    with SshTransport.from_target(inventory.load(golden_home, nspawn_vm)) as ssh:
        ssh.put(
            json.dumps({**forged, "body": json.dumps(WANT)}).encode(),
            f"{STORE}/rq-ffffffffffffffff.json",
            mode=0o644,
        )
    return {"good": good["doc"]["request"], "bad": bad["doc"]["request"], "forged": "rq-ffffffffffffffff"}


def test_a_refused_agent_is_told_how_to_ask(
    golden_home: Home, nspawn_vm: str, applied: dict[str, Any]
) -> None:
    got = agent(
        golden_home, nspawn_vm, scheme="https", host="api.example.test", method="GET", path="/v2/things"
    )
    policy = applied["observations"]["gateway"]["policies"]["gw"]
    assert got == {
        "status": 403,
        "doc": {
            "denied": True,
            "reason": "path-not-allowed",
            "destination": "api.example.test:443",
            "policy": policy,
            "request": "POST http://avm.boundary/requests",
            "policy_at": "GET http://avm.boundary/policy",
        },
    }


def test_the_agent_reads_the_policy_that_applies_to_it_and_cannot_change_it(
    golden_home: Home, nspawn_vm: str, applied: dict[str, Any], filed: dict[str, str]
) -> None:
    forged = {"x-avm-identity": "profile:other"}
    got = agent(
        golden_home,
        nspawn_vm,
        scheme="http",
        host="avm.boundary",
        method="GET",
        path="/policy",
        headers=forged,
    )
    assert got["status"] == 200, got
    doc = got["doc"]
    assert (doc["identity"], doc["policy"]) == (
        "profile:gw",
        applied["observations"]["gateway"]["policies"]["gw"],
    )
    assert doc["names"] == [
        {
            "host": "api.example.test",
            "port": 443,
            "methods": ["GET", "POST"],
            "paths": ["/v1/*"],
            "credential_header": "x-api-key",
        }
    ]
    assert doc["request"] == "POST http://avm.boundary/requests"
    # there is no way to write a policy: any other method or path is Envoy's own 404
    for method, path in (
        ("PUT", "/policy"),
        ("POST", "/policy"),
        ("GET", "/requests"),
        ("DELETE", "/requests"),
    ):
        other = agent(
            golden_home, nspawn_vm, scheme="http", host="avm.boundary", method=method, path=path, body="{}"
        )
        assert (other["status"], other["doc"]["error"]) == (404, "not-found"), (method, path, other)
    # a body over the limit is refused by the gateway itself: nothing more is stored
    stored = on_host(golden_home, nspawn_vm, "ls", STORE).split()
    assert ask(golden_home, nspawn_vm, "x" * 9000) == {"status": 413, "doc": None}
    assert on_host(golden_home, nspawn_vm, "ls", STORE).split() == stored
    # nor a way around the gateway to the recorder or its store (it exists: requests were filed)
    poke = (
        "import socket, os\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect('/run/avm-requests/requests.sock'); print('connected')\n"
        "except OSError as e:\n    print('errno', e.errno)\n"
        "try:\n    open('/var/lib/avm-requests/rq-0000000000000000.json', 'x'); print('wrote')\n"
        "except OSError as e:\n    print('errno', e.errno)\n"
    )
    assert agent_python(golden_home, nspawn_vm, poke).split("\n")[:2] == ["errno 13", "errno 13"]


def test_the_recorder_runs_under_its_own_user_without_network_or_capabilities(
    golden_home: Home, nspawn_vm: str, filed: dict[str, str]
) -> None:
    shown = on_host(
        golden_home, nspawn_vm, "systemctl", "show", "-p", "User,ActiveState,MainPID", "avm-requests"
    )
    props = dict(line.split("=", 1) for line in shown.splitlines())
    assert (props["User"], props["ActiveState"]) == ("avm-requests", "active")  # started by the requests
    caps = on_host(golden_home, nspawn_vm, "grep", "^CapEff", f"/proc/{props['MainPID']}/status")
    assert int(caps.split()[1], 16) == 0
    sock = on_host(golden_home, nspawn_vm, "stat", "-c", "%a %U %G", "/run/avm-requests/requests.sock")
    assert sock.strip() == "660 avm-requests avm-gateway"
    out = on_host(golden_home, nspawn_vm, "systemd-analyze", "security", "--no-pager", "avm-requests.service")
    found = re.search(r"Overall exposure level for avm-requests.service: ([0-9.]+)", out)
    assert found is not None, out[-2000:]
    print(f"systemd-analyze security avm-requests.service: {found.group(1)}")
    assert float(found.group(1)) <= 1.0, out[-3000:]


def test_requests_are_collected_and_judged_with_the_hostile_ones_invalid(
    golden_home: Home, nspawn_vm: str, applied: dict[str, Any], filed: dict[str, str]
) -> None:
    rc, doc = avm(golden_home, "egress", "requests", "--target", nspawn_vm)
    assert rc == 0, doc
    by_id = {e["id"]: e for e in doc["requests"]}
    assert sorted(by_id) == sorted(filed.values())
    good = by_id[filed["good"]]
    policy = applied["observations"]["gateway"]["policies"]["gw"]
    # the identity is the listener's: the agent's x-avm-identity header was overwritten
    assert (good["state"], good["profile"], good["from"], good["reason"]) == (
        "pending",
        "gw",
        policy,
        "read the v2 API",
    )
    assert good["rule"] == {"host": "api.example.test", "port": 443, "methods": ["GET"], "paths": ["/v2/*"]}
    assert good["approvers_needed"] == 1
    bad = by_id[filed["bad"]]
    assert (bad["state"], bad["error"]) == (
        "invalid",
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    )
    forged = by_id[filed["forged"]]
    assert (forged["state"], forged["error"]) == ("invalid", "not written by the recorder (owner root)")
    receipt = receipt_of(golden_home, doc["receipt"])
    assert receipt["kind"] == "egress-requests"
    assert sorted((e["request"], e["state"]) for e in receipt["events"]) == sorted(
        [(filed["good"], "pending"), (filed["bad"], "invalid"), (filed["forged"], "invalid")]
    )
    # the operator's table: one line per request, the change it asks for under it
    lines = run_avm(golden_home, "egress", "requests", "--target", nspawn_vm).stdout.splitlines()
    assert f"{filed['good']}  pending  gw           GET api.example.test:443 /v2/*" in lines
    assert f"{filed['forged']}  invalid  ?            not written by the recorder (owner root)" in lines
    assert lines[-1].startswith("receipt #") and lines[-1].endswith(" (egress-requests)")
    # an invalid request cannot be approved (refused before any key is read)
    rc, out = avm(golden_home, "approve", "--request", filed["forged"], "--key", "/dev/null")
    assert (rc, out["error"]["code"]) == (3, "request-not-pending")


def _refused_unchanged(home: Home, vm: str, applied: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    before = in_force(home, vm)
    rc, out = avm(home, "egress", "apply", "--target", vm, "--apply")
    assert rc == 3, out
    assert out["error"]["code"] == "approval-missing"
    assert [r["reason"] for r in out["error"]["details"]["rejected"]] == reasons
    assert out["error"]["details"]["actual"] == 0
    assert in_force(home, vm) == before  # the host unchanged
    assert (before["lds"], before["cds"]) == (
        applied["observations"]["gateway"]["generation"],
        applied["observations"]["gateway"]["cds_version"],
    )
    return out


def test_without_an_approval_nothing_is_applied(
    golden_home: Home, nspawn_vm: str, applied: Any, filed: Any
) -> None:
    _refused_unchanged(golden_home, nspawn_vm, applied, [])


def test_an_approval_forged_by_the_agent_is_refused(
    golden_home: Home, nspawn_vm: str, applied: dict[str, Any], filed: dict[str, str], tmp_path: Path
) -> None:
    """The agent makes a key of its own and signs the exact change digest; the approval is put
    on the host (where nothing reads one) and even into the ledger: its key is no approver's."""
    rc, doc = avm(golden_home, "egress", "requests", "--target", nspawn_vm)
    digest = next(e["change_digest"] for e in doc["requests"] if e["id"] == filed["good"])
    _, agent_key, _ = approvals.init_approver(tmp_path / "agent-key")
    keyid, envelope = approvals.sign(agent_key, digest, 3600)
    # the agent can put it in its own files, and in the body of a request; not in the store
    write = (
        "import sys\n"
        "open('/tmp/approval.json', 'w').write(sys.argv[1]); print('tmp ok')\n"
        "try:\n    open('/var/lib/avm-requests/' + sys.argv[2] + '.approval.json', 'w'); print('store ok')\n"
        "except OSError as e:\n    print('errno', e.errno)\n"
    )
    out = agent_python(golden_home, nspawn_vm, write, json.dumps(envelope), filed["good"])
    assert out.split("\n")[:2] == ["tmp ok", "errno 13"]
    posted = ask(golden_home, nspawn_vm, json.dumps({**WANT, "approval": envelope}))
    assert posted["status"] == 202
    on_host(golden_home, nspawn_vm, "cp", "/dev/null", f"/var/lib/avm-requests/{filed['good']}.approved")
    _refused_unchanged(golden_home, nspawn_vm, applied, [])
    # the same signature in the ledger, as if the agent's key were an approver's
    rc, signed = avm(golden_home, "approve", "--request", filed["good"], "--key", str(agent_key))
    assert rc == 0, signed
    assert signed["approver"] == keyid
    _refused_unchanged(golden_home, nspawn_vm, applied, ["untrusted-approver"])
    rc, doc = avm(golden_home, "egress", "requests", "--target", nspawn_vm)
    states = {e["id"]: (e["state"], e.get("error")) for e in doc["requests"]}
    assert states[posted["doc"]["request"]] == ("invalid", "approval: Extra inputs are not permitted")
    assert states[filed["good"]] == ("pending", None)


@pytest.fixture(scope="module")
def approver(golden_home: Home, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("approver") / "key"
    rc, doc = avm(golden_home, "keys", "approver-init", "--out", str(out))
    assert rc == 0, doc
    rc, doc = avm(golden_home, "keys", "approver-trust", str(out / "approver.pub"))
    assert rc == 0, doc
    return out / "approver.key"


def test_an_expired_approval_is_refused(
    golden_home: Home, nspawn_vm: str, applied: dict[str, Any], filed: dict[str, str], approver: Path
) -> None:
    rc, signed = avm(
        golden_home, "approve", "--request", filed["good"], "--key", str(approver), "--expires", "1s"
    )
    assert rc == 0, signed
    time.sleep(2)  # past its expiry (not a timed assertion: the approval's own clock)
    _refused_unchanged(golden_home, nspawn_vm, applied, ["expired", "untrusted-approver"])


def test_an_approved_request_is_applied_by_hot_reload_and_the_agent_reaches_it(
    golden_home: Home, nspawn_vm: str, applied: dict[str, Any], filed: dict[str, str], approver: Path
) -> None:
    pid = main_pid(golden_home, nspawn_vm)
    rc, signed = avm(golden_home, "approve", "--request", filed["good"], "--key", str(approver))
    assert rc == 0, signed
    rc, plan = avm(golden_home, "egress", "apply", "--target", nspawn_vm)
    assert rc == 0, plan
    assert (plan["applied"], plan["requests"]) == (False, [filed["good"]])
    rc, out = avm(golden_home, "egress", "apply", "--target", nspawn_vm, "--apply")
    assert rc == 0, out
    assert (out["applied"], out["plan_digest"], out["requests"]) == (
        True,
        plan["plan_digest"],
        [filed["good"]],
    )
    print(f"egress apply of a request: in force in {out['reload_s']} s")
    receipt = receipt_of(golden_home, out["receipts"]["apply"])
    assert [c for c in receipt["checks"] if not c["ok"]] == []
    names = {c["name"] for c in receipt["checks"]}
    assert {"gateway-reload", "agents-not-restarted", "boundary-policy:gw", "egress-granted:gw:0"} <= names
    assert receipt["result"]["requests_applied"] == [filed["good"]]
    assert [a["approver"] for a in receipt["result"]["approvals"]] == [signed["approver"]]
    plan_receipt = receipt_of(golden_home, out["receipts"]["plan"])
    assert [c["name"] for c in plan_receipt["checks"]] == [f"request-change:{filed['good']}"]
    assert main_pid(golden_home, nspawn_vm) == pid
    got = agent(
        golden_home, nspawn_vm, scheme="https", host="api.example.test", method="GET", path="/v2/things"
    )
    assert got == {"status": 200, "doc": None}
    rc, doc = avm(golden_home, "egress", "requests", "--target", nspawn_vm, "--all")
    entry = next(e for e in doc["requests"] if e["id"] == filed["good"])
    assert entry["state"] == "applied"
    view = agent(golden_home, nspawn_vm, scheme="http", host="avm.boundary", method="GET", path="/policy")[
        "doc"
    ]
    assert view["policy"] == entry["to"]
    assert view["names"][0]["paths"] == ["/v1/*", "/v2/*"]
    # applied once: not again
    rc, again = avm(golden_home, "approve", "--request", filed["good"], "--key", str(approver))
    assert (rc, again["error"]["code"]) == (3, "request-not-pending")
    rc, status = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, status


def test_a_denied_request_is_recorded_and_never_applied(
    golden_home: Home, nspawn_vm: str, applied: dict[str, Any], approver: Path
) -> None:
    filed = ask(golden_home, nspawn_vm, json.dumps({**WANT, "paths": ["/v3/*"], "reason": "more"}))
    rid = filed["doc"]["request"]
    assert avm(golden_home, "egress", "requests", "--target", nspawn_vm)[0] == 0
    rc, out = avm(golden_home, "egress", "deny", "--request", rid, "--reason", "not needed")
    assert rc == 0, out
    # decided: refused at once, before any new collection
    rc, twice = avm(golden_home, "egress", "deny", "--request", rid)
    assert (rc, twice["error"]["code"]) == (3, "request-not-pending")
    rc, early = avm(golden_home, "approve", "--request", rid, "--key", str(approver))
    assert (rc, early["error"]["message"]) == (3, f"request {rid} is denied; it cannot be approved")
    assert receipt_of(golden_home, out["receipt"])["events"] == [
        {"type": "permission.denied", "request": rid, "profile": "gw", "reason": "not needed"}
    ]
    rc, doc = avm(golden_home, "egress", "requests", "--target", nspawn_vm, "--all")
    assert next(e["state"] for e in doc["requests"] if e["id"] == rid) == "denied"
    rc, again = avm(golden_home, "approve", "--request", rid, "--key", str(approver))
    assert (rc, again["error"]["code"]) == (3, "request-not-pending")
    rc, none = avm(golden_home, "egress", "apply", "--target", nspawn_vm, "--apply")
    assert (rc, none["error"]["code"]) == (64, "egress-no-approved-requests")
    got = agent(golden_home, nspawn_vm, scheme="https", host="api.example.test", method="GET", path="/v3/x")
    assert (got["status"], got["doc"]["reason"]) == (403, "path-not-allowed")


def test_status_reports_a_stopped_recorder_as_drift(golden_home: Home, nspawn_vm: str, applied: Any) -> None:
    on_host(golden_home, nspawn_vm, "systemctl", "stop", "avm-requests.socket")
    try:
        rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
        assert rc == 2, doc
        assert [(f["where"], f["what"], f["actual"]) for f in doc["findings"]] == [
            ("avm-requests.socket", "permission-request recorder socket", "inactive")
        ]
    finally:
        on_host(golden_home, nspawn_vm, "systemctl", "start", "avm-requests.socket")
    assert avm(golden_home, "status", "--target", nspawn_vm)[0] == 0


def test_every_step_is_a_receipt_and_the_ledger_verifies(golden_home: Home, applied: Any) -> None:
    rc, doc = avm(golden_home, "receipts", "verify")
    assert rc == 0, doc
    assert newest(golden_home, "egress-request-denied")["status"] == "ok"
    assert newest(golden_home, "egress-requests")["status"] == "ok"
