"""The content classifier on a real nspawn golden host (issue 15 part 2, Tier-1), in order.

The profile of tests/plugins/tier1gw.py lists ``api.example.test`` with ``max_sensitivity:
internal, inspect: true``. ``avm promote --apply`` installs ``avm-classifier.service`` (the
stdlib reference classifier, its own user, no network, a unix socket only the gateway's group
reaches) next to ``avm-gateway.service``. Requests are made as the agent from inside its unit:
a card number is refused at the gateway, a clean body passes, the agent's own labels change
nothing, the classifier stopped is a denial, and the agent cannot reach the classifier at all.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from controlplane.home import Home
from tests.plugins.tier1gw import (
    OUTPUTS,
    agent_argv,
    avm,
    egress_apply,
    newest,
    on_host,
    post_as_agent,
    promote,
    receipt_of,
)

CARD = "4111 1111 1111 1111"
CARD_BODY = json.dumps({"messages": [{"role": "user", "content": f"bill card {CARD}"}]})
CLEAN_BODY = json.dumps({"messages": [{"role": "user", "content": "summarise the notes"}]})


@pytest.fixture(scope="module")
def applied(
    golden_home: Home, gw_repo: dict[str, Any], nspawn_vm: str, gw_upstream: dict[str, Any]
) -> dict[str, Any]:
    rc, doc = promote(golden_home, gw_repo, "inspected", nspawn_vm, "--apply")
    assert rc == 0, doc
    return receipt_of(golden_home, doc["receipts"]["apply"])


def test_apply_runs_the_classifier_and_the_probes_pass_through_it(applied: dict[str, Any]) -> None:
    checks = {c["name"]: c for c in applied["checks"]}
    for name in ("classifier-running", "gateway-in-force", "boundary-table", "egress-listed:gw"):
        assert checks[name]["ok"] is True, checks[name]
    observed = applied["observations"]["classifier"]
    assert observed["unit"] == "avm-classifier.service"
    assert sorted(observed["files"]) == [
        "/etc/systemd/system/avm-classifier.service",
        "/usr/local/lib/avm-classifier/controlplane/boundary/classify.py",
        "/usr/local/lib/avm-classifier/controlplane/boundary/classifyd.py",
        "/usr/local/lib/avm-classifier/controlplane/governance/secretscan.py",
    ]


def test_a_card_number_is_refused_and_a_clean_body_passes(
    golden_home: Home, nspawn_vm: str, applied: Any, gw_upstream: dict[str, Any]
) -> None:
    before = len(gw_upstream["log"].read_text().splitlines())
    got = post_as_agent(golden_home, nspawn_vm, "/v1/messages", CARD_BODY)
    assert got == {"status": 403, "reason": "sensitivity-exceeds-ceiling", "findings": "card"}
    assert len(gw_upstream["log"].read_text().splitlines()) == before
    ok = post_as_agent(golden_home, nspawn_vm, "/v1/messages", CLEAN_BODY)
    assert ok == {"status": 200, "reason": None, "findings": None}
    seen = json.loads(gw_upstream["log"].read_text().splitlines()[-1])
    assert (seen["path"], seen["body"]) == ("/v1/messages", CLEAN_BODY)


def test_the_agent_labelling_its_payload_public_is_still_refused(
    golden_home: Home, nspawn_vm: str, applied: Any, gw_upstream: dict[str, Any]
) -> None:
    before = len(gw_upstream["log"].read_text().splitlines())
    labels = {"x-avm-sensitivity": "public", "x-avm-findings": "-", "x-sensitivity": "public"}
    body = json.dumps({"sensitivity": "public", "content": f"card {CARD}"})
    got = post_as_agent(golden_home, nspawn_vm, "/v1/messages", body, **labels)
    assert got == {"status": 403, "reason": "sensitivity-exceeds-ceiling", "findings": "card"}
    assert len(gw_upstream["log"].read_text().splitlines()) == before


def test_the_agent_cannot_reach_the_classifier(golden_home: Home, nspawn_vm: str, applied: Any) -> None:
    probe = (
        "import socket\ns = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect('/run/avm-classifier/classifier.sock'); print('connected')\n"
        "except OSError as e:\n    print(type(e).__name__)"
    )
    out = on_host(golden_home, nspawn_vm, *agent_argv(golden_home, nspawn_vm), "python3", "-c", probe)
    print(f"agent connecting to the classifier socket: {out.strip()}")
    assert out.strip() == "PermissionError"
    # it is the permission, not the path: root sees the socket, 0660 in a 0750 directory
    listing = on_host(
        golden_home,
        nspawn_vm,
        "stat",
        "-c",
        "%a %U %G",
        "/run/avm-classifier",
        "/run/avm-classifier/classifier.sock",
    )
    assert listing.split("\n")[:2] == [
        "750 avm-classifier avm-classifier",
        "660 avm-classifier avm-classifier",
    ]
    groups = on_host(golden_home, nspawn_vm, "id", "-nG", "agent-gw").split()
    assert "avm-classifier" not in groups


def test_the_classifier_unit_is_hardened_under_its_own_user(
    golden_home: Home, nspawn_vm: str, applied: Any
) -> None:
    shown = on_host(
        golden_home, nspawn_vm, "systemctl", "show", "-p", "User,ActiveState,MainPID", "avm-classifier"
    )
    props = dict(line.split("=", 1) for line in shown.splitlines())
    assert (props["User"], props["ActiveState"]) == ("avm-classifier", "active")
    caps = on_host(golden_home, nspawn_vm, "grep", "^CapEff", f"/proc/{props['MainPID']}/status")
    assert int(caps.split()[1], 16) == 0
    # no network: its namespace has loopback only, and it is not the host's
    links = on_host(golden_home, nspawn_vm, "nsenter", "-t", props["MainPID"], "-n", "ip", "-o", "link")
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
    out = on_host(
        golden_home, nspawn_vm, "systemd-analyze", "security", "--no-pager", "avm-classifier.service"
    )
    score = float(re.search(r"Overall exposure level for avm-classifier.service: ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    print(f"systemd-analyze security avm-classifier.service: {score}")
    assert score <= 1.0, out[-2000:]


def test_the_classifier_stopped_is_a_denial(
    golden_home: Home, nspawn_vm: str, applied: Any, gw_upstream: dict[str, Any]
) -> None:
    before = len(gw_upstream["log"].read_text().splitlines())
    on_host(golden_home, nspawn_vm, "systemctl", "stop", "avm-classifier")
    try:
        got = post_as_agent(golden_home, nspawn_vm, "/v1/messages", CLEAN_BODY)
        assert got == {"status": 403, "reason": "classifier-unavailable", "findings": None}
        assert len(gw_upstream["log"].read_text().splitlines()) == before
        rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
        assert rc == 2, doc
        assert [(f["what"], f["actual"]) for f in doc["findings"]] == [
            ("content classifier unit", "inactive")
        ]
    finally:
        on_host(golden_home, nspawn_vm, "systemctl", "start", "avm-classifier")
    sock = "/run/avm-classifier/classifier.sock"
    wait = f"for i in $(seq 50); do test -S {sock} && exit 0; sleep 0.2; done; exit 1"
    on_host(golden_home, nspawn_vm, "sh", "-c", wait)
    assert post_as_agent(golden_home, nspawn_vm, "/v1/messages", CLEAN_BODY)["status"] == 200


def test_status_reports_changed_classifier_code_as_drift(
    golden_home: Home, nspawn_vm: str, applied: Any
) -> None:
    path = "/usr/local/lib/avm-classifier/controlplane/boundary/classify.py"
    original = on_host(golden_home, nspawn_vm, "cat", path)
    on_host(golden_home, nspawn_vm, "sh", "-c", f"echo '# tampered' >> {path}")
    try:
        rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
        assert rc == 2, doc
        assert [(f["what"], f["where"]) for f in doc["findings"]] == [("content classifier code", path)]
    finally:
        on_host(golden_home, nspawn_vm, "python3", "-c", f"open({path!r}, 'w').write({original!r})")
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, doc


def test_status_records_the_classifier_denial_with_kinds_never_the_text(
    golden_home: Home, nspawn_vm: str, applied: Any
) -> None:
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, doc
    events = [e for e in newest(golden_home, "status")["events"] if e["type"] == "classifier.denied"]
    assert [(e["profile"], e["reason"], e["sensitivity"], e["findings"]) for e in events] == [
        ("gw", "sensitivity-exceeds-ceiling", "restricted", ["card"]),
        ("gw", "sensitivity-exceeds-ceiling", "restricted", ["card"]),
    ]
    rc, shown = avm(golden_home, "egress", "log", "--target", nspawn_vm)
    assert rc == 0, shown
    logged = [e for e in shown["events"] if e["event"] == "classifier.denied"]
    assert [(e["sensitivity"], e["findings"], e["classifier"]) for e in logged] == [
        ("restricted", ["card"], "avm-reference@1"),
        ("restricted", ["card"], "avm-reference@1"),
    ]
    log = on_host(golden_home, nspawn_vm, "cat", "/var/log/avm-gateway/access.log")
    for text in ("4111", CARD):
        assert text not in log and text not in json.dumps(events)
    assert not [o for o in OUTPUTS if "4111" in o]


def test_a_promotion_without_inspection_removes_the_classifier(
    golden_home: Home, gw_repo: dict[str, Any], nspawn_vm: str, applied: Any
) -> None:
    rc, doc = promote(golden_home, gw_repo, "good", nspawn_vm, "--apply")
    assert rc == 0, doc
    active = on_host(golden_home, nspawn_vm, "systemctl", "is-active", "avm-classifier", check=False)
    assert active.strip() == "inactive"
    left = ["/usr/local/lib/avm-classifier", "/etc/systemd/system/avm-classifier.service"]
    assert on_host(golden_home, nspawn_vm, "ls", "-d", *left, check=False).strip() == ""
    # the gateway stays, and the name is no longer inspected: the same body now passes
    assert on_host(golden_home, nspawn_vm, "systemctl", "is-active", "avm-gateway").strip() == "active"
    assert post_as_agent(golden_home, nspawn_vm, "/v1/messages", CARD_BODY)["status"] == 200


def test_egress_apply_of_an_inspected_name_starts_the_classifier_without_restarting_agents(
    golden_home: Home, gw_repo: dict[str, Any], nspawn_vm: str, applied: Any
) -> None:
    rc, doc = egress_apply(golden_home, gw_repo, "inspected", nspawn_vm, "--apply")
    assert rc == 0, doc
    checks = {c["name"]: c["ok"] for c in receipt_of(golden_home, doc["receipts"]["apply"])["checks"]}
    assert (checks["classifier-running"], checks["gateway-reload"], checks["agents-not-restarted"]) == (
        True,
        True,
        True,
    )
    got = post_as_agent(golden_home, nspawn_vm, "/v1/messages", CARD_BODY)
    assert got == {"status": 403, "reason": "sensitivity-exceeds-ceiling", "findings": "card"}
    assert post_as_agent(golden_home, nspawn_vm, "/v1/messages", CLEAN_BODY)["status"] == 200
