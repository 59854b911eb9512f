"""Governance gates end to end on a real golden host (nspawn: real systemd, sshd, the gateway).

In order, against one VM: a tier refusal before planning; an L2 promotion refused without an
approval, applied with one bound to its plan digest, refused again when the plan changes; the
MCP allowlist on the host with the denial reaching a receipt; a corrupted policy file that makes
the gateway refuse to start and `avm status` report drift; then a sweep of every artifact of
the run for the secret's value, and the event vocabulary of every receipt.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml

from controlplane.errors import RefusedError
from controlplane.evidence.events import EVENT_TYPES
from controlplane.governance import approvals, secrets
from controlplane.home import Home
from controlplane.promote import pipeline as promotion
from controlplane.release import trust as signing
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from tests.plugins.agentrepo import PASSWORD, _commit, copy_example, git
from tests.plugins.vms import run_avm

PORT = 18081
SECRET_REF = "secret://local/gov-token"
OUTPUTS: list[str] = []  # every stdout/stderr of the run, for the leak sweep


def _manifest(tier: str, **extra: Any) -> str:
    search = "f590c569413b140e00c4f7239e66819edaffac388d3a189b6b7e256f5e3a4daf"
    profile = {
        "name": "gov",
        "risk_tier": tier,
        "entrypoint": ["python3", "agent.py"],
        "env": {"GATEWAY_PORT": str(PORT)},
        "secrets": {"API_TOKEN": SECRET_REF},
        "tools": [{"name": "search", "schema_sha256": search}],
        "health": {"port": PORT, "path": "/healthz", "timeout_s": 20},
        **extra,
    }
    return yaml.safe_dump({"soak_s": 0, "profiles": [profile]})


@pytest.fixture(scope="module")
def gov(tmp_path_factory: pytest.TempPathFactory, golden_home: Home) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gov")
    repo = root / "gov-agent"
    copy_example(repo)
    git(repo, "init", "-q", "-b", "main")
    commits = {}
    for name, text in (
        ("l3", _manifest("L3")),
        ("l2", _manifest("L2")),
        ("l2b", _manifest("L2", canary=True)),
    ):
        (repo / "avm.yaml").write_text(text)
        commits[name] = _commit(repo, name)
    _, key, pub = signing.release_init(root / "release-key", PASSWORD)
    signing.trust_release_key(golden_home, pub, "release")
    for sha in commits.values():
        signing.sign_release(golden_home, repo, sha, key, PASSWORD)
    value = b"gov-" + os.urandom(24).hex().encode()
    secrets.put(golden_home, SECRET_REF, value)
    alice = approvals.init_approver(root / "alice")[1:]
    approvals.trust_approver(golden_home, alice[1])
    return {"repo": repo, "commits": commits, "secret": value, "alice": alice[0]}


def avm(home: Home, *args: str) -> tuple[int, dict[str, Any]]:
    out = run_avm(home, "--json", *args)
    OUTPUTS.extend([out.stdout, out.stderr])
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {}


def promote(home: Home, g: dict[str, Any], commit: str, vm: str, *extra: str) -> tuple[int, dict[str, Any]]:
    return avm(
        home, "promote", "--repo", str(g["repo"]), "--commit", g["commits"][commit], "--target", vm, *extra
    )


def on_host(home: Home, vm: str, *argv: str, check: bool = True) -> str:
    with SshTransport.from_target(inventory.load(home, vm)) as ssh:
        result = ssh.run(list(argv), timeout=60)
    out = (result.check() if check else result).stdout
    OUTPUTS.append(out)
    return out


def receipt(home: Home, seq: str) -> dict[str, Any]:
    return avm(home, "receipts", "show", seq)[1]["statement"]["predicate"]  # type: ignore[no-any-return]


def test_tier_refusal_names_each_missing_control_before_planning(
    golden_home: Home, gov: dict[str, Any], nspawn_vm: str
) -> None:
    rc, doc = promote(golden_home, gov, "l3", nspawn_vm, "--apply")
    assert rc == 3, doc
    error = doc["error"]
    assert error["code"] == "tier-controls-missing"
    assert "canary-soak" in error["message"] and "rollback-drill" in error["message"]
    assert error["details"]["profile gov"]["missing"] == ["canary-soak", "rollback-drill"]
    assert on_host(golden_home, nspawn_vm, "ls", "/etc/agent", check=False).strip() == ""  # nothing written


def _live_ssh_sessions() -> list[paramiko.Transport]:
    """paramiko runs one thread per SSH connection in this process; a closed one is inactive
    at once (its thread then winds down on its own)."""
    return [t for t in threading.enumerate() if isinstance(t, paramiko.Transport) and t.is_active()]


def test_promote_closes_the_host_connection_when_it_fails_or_is_refused_after_connecting(
    golden_home: Home, gov: dict[str, Any], nspawn_vm: str
) -> None:
    """In process, against the real host: whatever ends ``promotion.run`` after it connected
    (here the progress writer failing on the approval notice, as a closed stdout does, and the
    approval refusal of --apply) leaves no SSH connection open."""
    before = _live_ssh_sessions()

    def progress(line: str) -> None:
        if line.startswith("approval required"):  # printed after the plan, with the host connected
            raise BrokenPipeError("stdout closed")

    with pytest.raises(BrokenPipeError):
        promotion.run(
            golden_home, repo=gov["repo"], ref=gov["commits"]["l2"], target=nspawn_vm, progress=progress
        )
    assert _live_ssh_sessions() == before
    with pytest.raises(RefusedError) as refused:
        promotion.run(golden_home, repo=gov["repo"], ref=gov["commits"]["l2"], target=nspawn_vm, apply=True)
    assert refused.value.code == "approval-missing"
    assert _live_ssh_sessions() == before
    assert on_host(golden_home, nspawn_vm, "ls", "/etc/agent", check=False).strip() == ""  # nothing written


def test_l2_apply_needs_an_approval_bound_to_exactly_this_plan(
    golden_home: Home, gov: dict[str, Any], nspawn_vm: str
) -> None:
    rc, dry = promote(golden_home, gov, "l2", nspawn_vm)
    assert rc == 0 and dry["approvals_required"] == 1 and dry["tiers"] == {"gov": "L2"}
    rc, doc = promote(golden_home, gov, "l2", nspawn_vm, "--apply")
    assert rc == 3 and doc["error"]["code"] == "approval-missing", doc
    rc, _ = avm(golden_home, "approve", "--plan", dry["plan_digest"], "--key", str(gov["alice"]))
    assert rc == 0
    rc, done = promote(golden_home, gov, "l2", nspawn_vm, "--apply")
    assert rc == 0, done
    assert [a["plan"] for a in done["approvals"]] == [dry["plan_digest"]]
    applied = receipt(golden_home, done["receipts"]["apply"])
    assert applied["result"]["approvals"] == done["approvals"]
    types = [e["type"] for e in applied["events"]]
    assert "approval.accepted" in types
    loads = [e for e in applied["events"] if e["type"] == "secret.load"]
    assert loads and loads[0]["ref"] == SECRET_REF and loads[0]["version"].startswith("local:mtime-ns:")
    # a changed plan (here: a new release) has a new digest: the approval does not carry over
    rc, changed = promote(golden_home, gov, "l2b", nspawn_vm, "--apply")
    assert rc == 3 and changed["error"]["code"] == "approval-missing"
    assert changed["error"]["details"]["other_plans"] >= 1


MCP = """import json, sys, urllib.request as u
for m in sys.argv[1:]:
    method, _, tool = m.partition(":")
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {"name": tool, "arguments": {}}}
    r = u.Request("http://127.0.0.1:PORT/mcp", data=json.dumps(body).encode())
    print(u.urlopen(r).read().decode())
""".replace("PORT", str(PORT))


def test_tool_allowlist_on_the_host_and_denials_reach_the_status_receipt(
    golden_home: Home, nspawn_vm: str
) -> None:
    out = on_host(golden_home, nspawn_vm, "python3", "-c", MCP, "tools/list", "tools/call:delete_records")
    listed, denied = (json.loads(ln) for ln in out.splitlines())
    assert [t["name"] for t in listed["result"]["tools"]] == ["search"]
    assert denied["error"]["data"]["reason"] == "not-allowed"
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, doc
    status_seq = avm(golden_home, "receipts", "list", "--last", "1")[1]["receipts"][-1]["seq"]
    events = receipt(golden_home, str(status_seq))["events"]
    assert {
        "type": "tool.denied",
        "profile": "gov",
        "tool": "delete_records",
        "reason": "not-allowed",
    } in events
    assert any(e["type"] == "alignment.check" and e["in_sync"] for e in events)


def test_corrupted_policy_on_the_host_stops_the_gateway_and_status_reports_drift(
    golden_home: Home, nspawn_vm: str
) -> None:
    on_host(golden_home, nspawn_vm, "sh", "-c", "echo '{ corrupted' > /etc/agent/gov.policy.json")
    on_host(golden_home, nspawn_vm, "systemctl", "restart", "agent-gateway@gov.service", check=False)
    # Type=simple: "active" the moment python starts; Restart=on-failure retries until the start
    # limit (5 in 60 s) leaves the unit failed. Wait for that, then read the gateway's exit status.
    unit = "agent-gateway@gov.service"
    wait = (
        f"for i in $(seq 150); do a=$(systemctl show -p ActiveState --value {unit}); "
        '[ "$a" = failed ] && break; sleep 0.2; done; '
        f'echo "$a $(systemctl show -p ExecMainStatus --value {unit})"'
    )
    assert on_host(golden_home, nspawn_vm, "sh", "-c", wait).split() == ["failed", "78"]  # EX_CONFIG
    health = on_host(golden_home, nspawn_vm, "python3", "-c", MCP, "tools/list", check=False)
    assert '"tools"' not in health  # nothing serves: no permissive fallback
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 2, doc
    whats = {f["what"].split(":")[0] for f in doc["findings"] if f["where"] == "gov"}
    assert {"tool policy", "unit state"} <= whats, doc["findings"]
    status_seq = avm(golden_home, "receipts", "list", "--last", "1")[1]["receipts"][-1]["seq"]
    events = receipt(golden_home, str(status_seq))["events"]
    assert any(e["type"] == "gateway.refused" and e["profile"] == "gov" for e in events), events


def test_the_secret_value_appears_in_no_artifact_of_the_run(
    golden_home: Home, gov: dict[str, Any], nspawn_vm: str, tmp_path: Path
) -> None:
    value = gov["secret"]
    # positive control: it is on the host, as a root-only systemd credential, and nowhere else
    assert on_host(
        golden_home, nspawn_vm, "stat", "-c", "%a %U", "/etc/agent/credentials/gov/API_TOKEN"
    ).strip() == ("600 root")
    export = tmp_path / "receipts.jsonl"
    assert avm(golden_home, "receipts", "export", "--out", str(export))[0] == 0
    artifacts: dict[str, bytes] = {"export": export.read_bytes()}
    for path in sorted(golden_home.receipts.glob("*.json")):
        raw = path.read_bytes()
        artifacts[path.name] = raw + base64.b64decode(json.loads(raw)["payload"])
    host = on_host(
        golden_home,
        nspawn_vm,
        "sh",
        "-c",
        "journalctl --no-pager -q; cat /etc/agent/*.env /etc/agent/*.json "
        "/etc/systemd/system/agent-gateway@gov.service.d/*; systemctl show agent-gateway@gov.service",
    )
    artifacts["host"] = host.encode()
    artifacts["cli-output"] = "".join(OUTPUTS).encode()
    # every file the control plane keeps (keys, inventory, VM logs, ...), except the secret store
    for path in sorted(golden_home.root.rglob("*")):
        rel = path.relative_to(golden_home.root)
        if (
            rel.parts[0] != "secrets"
            and path.is_file()
            and not path.is_symlink()
            and path.stat().st_size < 2**25
        ):
            artifacts[f"home/{rel}"] = path.read_bytes()
    assert "LoadCredential=API_TOKEN:/etc/agent/credentials/gov/API_TOKEN" in host
    leaked = [name for name, data in artifacts.items() if value in data]
    assert leaked == [], f"secret value found in {leaked}"
    assert len(artifacts) > 10


def test_every_receipt_event_is_in_the_fixed_vocabulary(golden_home: Home) -> None:
    seen = set()
    for path in sorted(golden_home.receipts.glob("*.json")):
        payload = json.loads(base64.b64decode(json.loads(path.read_bytes())["payload"]))
        seen |= {e["type"] for e in payload["predicate"]["events"]}
    assert seen <= set(EVENT_TYPES), seen - set(EVENT_TYPES)
    assert {"gate.decision", "approval.accepted", "secret.load", "tool.denied", "gateway.refused"} <= seen
