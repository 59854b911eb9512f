"""The egress gateway on a real nspawn golden host (issue 14, Tier-1), in order against one VM.

A profile lists ``api.example.test`` by name with a credential. The test upstream (its own test
CA, which only the gateway trusts) listens on the VM's veth host end, a link the test's VM owns.
``avm promote --apply`` installs ``avm-gateway.service`` (Envoy from the golden image, its own
user), the boundary table ``inet avm_boundary`` in the VM's namespace, and the agent's drop-in
(hosts file, nsswitch, CA bundle); then it probes from the agent's own sandbox. Also: an invalid
policy refused before signing (exit 64); a secret both injected and handed to the agent refused
at L3 (``credentials-at-boundary``, exit 3); the credential nowhere the agent can read it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane.boundary import usage
from controlplane.home import Home
from controlplane.promote import gateway, gatewaycheck
from controlplane.release import trust as signing
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from tests.plugins.agentrepo import PASSWORD
from tests.plugins.tier1gw import (
    OUTPUTS,
    REF,
    as_agent,
    avm,
    egress_apply,
    newest,
    on_host,
    promote,
    receipt_of,
)
from tests.plugins.vms import AVM, run_avm


def test_a_wildcard_alone_is_refused_before_signing_at_exit_64(
    golden_home: Home, gw_repo: dict[str, Any]
) -> None:
    sha = gw_repo["commits"]["wildcard"]
    env = {"COSIGN_PASSWORD": PASSWORD.decode()}
    rc, doc = avm(
        golden_home,
        "sign",
        "--repo",
        str(gw_repo["path"]),
        "--commit",
        sha,
        "--key",
        str(gw_repo["key"]),
        env=env,
    )
    assert rc == 64, doc
    assert doc["error"]["code"] == "egress-name-wildcard"
    assert doc["error"]["details"] == {
        "expected": "an exact name or '*.' + a name (a wildcard of the first label only)",
        "actual": "*",
    }
    assert not signing.signature_path(golden_home, sha).exists()


def test_a_secret_injected_and_also_handed_to_the_agent_fails_credentials_at_boundary(
    golden_home: Home, gw_repo: dict[str, Any], nspawn_vm: str
) -> None:
    rc, doc = promote(golden_home, gw_repo, "l3-leak", nspawn_vm)
    assert rc == 3, doc
    assert doc["error"]["code"] == "tier-controls-missing"
    assert doc["error"]["details"]["profile gw"]["missing"] == ["rollback-drill", "credentials-at-boundary"]
    reason = doc["error"]["details"]["profile gw"]["reasons"]["credentials-at-boundary"]
    assert reason == f"secret API_KEY ({REF}) is injected by the gateway and also handed to the agent"
    # the same profile without the secret under secrets: passes this control (only the drill is missing)
    rc, doc = promote(golden_home, gw_repo, "l3", nspawn_vm)
    assert rc == 3, doc
    assert doc["error"]["details"]["profile gw"]["missing"] == ["rollback-drill"]
    assert on_host(golden_home, nspawn_vm, "ls", "/etc/avm", check=False).strip() == ""  # nothing written


@pytest.fixture(scope="module")
def applied(
    golden_home: Home, gw_repo: dict[str, Any], nspawn_vm: str, gw_upstream: dict[str, Any]
) -> dict[str, Any]:
    rc, doc = promote(golden_home, gw_repo, "good", nspawn_vm, "--apply")
    assert rc == 0, doc
    return receipt_of(golden_home, doc["receipts"]["apply"])


def test_apply_starts_the_gateway_and_the_probes_see_the_boundary_in_force(
    golden_home: Home, applied: dict[str, Any], gw_upstream: dict[str, Any], gw_repo: dict[str, Any]
) -> None:
    checks = {c["name"]: c for c in applied["checks"]}
    for name in (
        "gateway-in-force",
        "boundary-table",
        "egress-listed:gw",
        "egress-wrong-path:gw",
        "egress-unlisted-name:gw",
        "egress-direct-ip:gw",
        "egress-dns:gw",
        "egress-metadata:gw",
    ):
        assert checks[name]["ok"] is True, checks[name]
    probe = applied["observations"]["gateway_probe"]["profiles"]["gw"]
    listener = applied["observations"]["gateway"]["listeners"]["gw"]
    assert probe["listed"] == {"resolved": [listener.split(":")[0]], "status": 200, "denied_reason": None}
    assert probe["wrong_path"] == {"status": 403, "denied_reason": "path-not-allowed"}
    assert probe["unlisted"]["resolved"].startswith("error")
    assert probe["direct"] == "timeout"  # the SYN dropped by the boundary table (unrouted: errno 101)
    assert (probe["dns"], probe["dns_received"]) == ("errno 1", 0)
    # the generation in force, read from Envoy's admin, is the rendered one
    in_force = applied["observations"]["gateway"]["in_force"]
    gateway = applied["observations"]["gateway"]
    assert (in_force["lds"], in_force["cds"]) == (gateway["generation"], gateway["cds_version"])
    # the upstream saw the probe's request with the injected credential, and only that value
    seen = [json.loads(line) for line in gw_upstream["log"].read_text().splitlines()]
    assert [r["path"] for r in seen] == ["/v1/avm-probe"]
    assert [v for k, v in seen[0]["headers"] if k == "x-api-key"] == [gw_repo["secret"].decode()]


def test_the_gateway_unit_is_hardened_under_its_own_user(
    golden_home: Home, nspawn_vm: str, applied: Any
) -> None:
    shown = on_host(
        golden_home, nspawn_vm, "systemctl", "show", "-p", "User,ActiveState,MainPID", "avm-gateway"
    )
    props = dict(line.split("=", 1) for line in shown.splitlines())
    assert (props["User"], props["ActiveState"]) == ("avm-gateway", "active")
    caps = on_host(golden_home, nspawn_vm, "grep", "^CapEff", f"/proc/{props['MainPID']}/status")
    assert int(caps.split()[1], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
    out = on_host(golden_home, nspawn_vm, "systemd-analyze", "security", "--no-pager", "avm-gateway.service")
    score = float(re.search(r"Overall exposure level for avm-gateway.service: ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    print(f"systemd-analyze security avm-gateway.service: {score}")
    assert score <= 2.5, out[-2000:]
    # the boot-time loader of the boundary table: enabled, required by the agent, skipped in a
    # container (here the table lives in the VM's namespace, loaded from the host side)
    boot = on_host(
        golden_home, nspawn_vm, "systemctl", "show", "-p", "UnitFileState,ConditionResult", "avm-boundary"
    )
    assert dict(line.split("=", 1) for line in boot.splitlines()) == {
        "UnitFileState": "enabled",
        "ConditionResult": "no",
    }
    required = on_host(
        golden_home, nspawn_vm, "systemctl", "show", "-p", "Requires", "--value", "agent-gateway@gw"
    )
    assert "avm-boundary.service" in required.split()
    nft = on_host(golden_home, nspawn_vm, "stat", "-c", "%a %U", "/etc/avm/boundary/boundary.nft")
    assert nft.strip() == "600 root"


def test_a_forged_credential_header_is_replaced(
    golden_home: Home, nspawn_vm: str, applied: Any, gw_upstream: dict[str, Any], gw_repo: dict[str, Any]
) -> None:
    got = as_agent(golden_home, nspawn_vm, "/v1/messages", forged="agent-made-this-up")
    assert got["status"] == 200, got
    seen = json.loads(gw_upstream["log"].read_text().splitlines()[-1])
    assert seen["path"] == "/v1/messages"
    assert [v for k, v in seen["headers"] if k == "x-api-key"] == [gw_repo["secret"].decode()]


def test_the_gateway_stopped_lets_nothing_out_and_restarted_serves_the_same_generation(
    golden_home: Home, nspawn_vm: str, applied: Any, gw_upstream: dict[str, Any]
) -> None:
    generation = applied["observations"]["gateway"]["generation"]
    clusters = applied["observations"]["gateway"]["cds_version"]
    before = len(gw_upstream["log"].read_text().splitlines())
    on_host(golden_home, nspawn_vm, "systemctl", "stop", "avm-gateway")
    try:
        got = as_agent(golden_home, nspawn_vm, "/v1/messages")
        assert got["error"].startswith("ConnectionRefusedError"), got  # nothing listens: no egress at all
        assert len(gw_upstream["log"].read_text().splitlines()) == before
        rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
        assert rc == 2, doc
        whats = sorted(f["what"] for f in doc["findings"])
        assert whats == ["egress gateway unit", "egress policy generation in force"], doc["findings"]
    finally:
        on_host(golden_home, nspawn_vm, "systemctl", "start", "avm-gateway")
    in_force = gatewaycheck.wait_in_force(
        SshTransport.from_target(inventory.load(golden_home, nspawn_vm)), generation, clusters
    )
    assert (in_force["lds"], in_force["cds"]) == (generation, clusters)
    assert as_agent(golden_home, nspawn_vm, "/v1/messages")["status"] == 200


def test_status_reports_a_changed_gateway_config_as_drift(
    golden_home: Home, nspawn_vm: str, applied: Any
) -> None:
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, doc
    assert doc["findings"] == []
    # the gateway's audit events since the apply: the probe's wrong path denied; the probe's,
    # the forged-header and the after-restart requests allowed (the stopped gateway logged none)
    events = [e for e in newest(golden_home, "status")["events"] if e["type"].startswith("egress.")]
    policy = applied["observations"]["gateway"]["policies"]["gw"]
    assert events == [
        {
            "type": "egress.denied",
            "profile": "gw",
            "host": "api.example.test",
            "method": "GET",
            "path": "/avm-probe/not-listed",
            "code": 403,
            "reason": "path-not-allowed",
            "policy": policy,
        },
        {
            "type": "egress.allowed",
            "profile": "gw",
            "destination": "GET api.example.test",
            "count": 3,
            "policy": policy,
        },
    ]
    hosts = "/etc/avm/boundary/gw/hosts"
    original = on_host(golden_home, nspawn_vm, "cat", hosts)
    on_host(golden_home, nspawn_vm, "sh", "-c", f"echo '10.0.0.9 api.example.test' >> {hosts}")
    try:
        rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
        assert rc == 2, doc
        assert [(f["where"], f["what"]) for f in doc["findings"]] == [(hosts, "egress boundary file")]
    finally:
        on_host(golden_home, nspawn_vm, "sh", "-c", f"printf '%s' '{original}' > {hosts}")
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, doc


def test_a_rejected_egress_update_keeps_the_last_good_generation(
    golden_home: Home, gw_repo: dict[str, Any], nspawn_vm: str, applied: Any, gw_upstream: dict[str, Any]
) -> None:
    generation = applied["observations"]["gateway"]["generation"]
    options = gateway.target_dir(golden_home, nspawn_vm) / "gateway.json"
    good = options.read_text()
    doc = json.loads(good)
    options.write_text(json.dumps({**doc, "upstreams": {"api.example.test:443": ["not-an-address", 443]}}))
    try:
        rc, out = egress_apply(golden_home, gw_repo, "wider", nspawn_vm, "--apply")
    finally:
        options.write_text(good)
    assert rc == 1, out
    assert out["error"]["code"] == "gateway-reload-rejected"
    receipt = newest(golden_home, "apply")
    assert receipt["status"] == "failed"
    check = next(c for c in receipt["checks"] if c["name"] == "gateway-reload")
    assert check["ok"] is False
    assert check["detail"].endswith(f"generation {generation} stays in force")
    with SshTransport.from_target(inventory.load(golden_home, nspawn_vm)) as ssh:
        in_force = gatewaycheck.read_in_force(ssh)
    clusters = applied["observations"]["gateway"]["cds_version"]
    assert (in_force["lds"], in_force["cds"]) == (generation, clusters)
    assert as_agent(golden_home, nspawn_vm, "/v1/messages")["status"] == 200


def test_egress_apply_hot_reloads_without_restarting_the_agent(
    golden_home: Home, gw_repo: dict[str, Any], nspawn_vm: str, applied: Any
) -> None:
    generation = applied["observations"]["gateway"]["generation"]
    denied = as_agent(golden_home, nspawn_vm, "/v2/things")
    assert (denied["status"], denied["reason"]) == (403, "path-not-allowed")
    pid = on_host(golden_home, nspawn_vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw")
    rc, plan = egress_apply(golden_home, gw_repo, "wider", nspawn_vm)
    assert rc == 0, plan
    assert (plan["applied"], plan["from"]) == (False, generation)
    assert plan["to"] != generation
    rc, out = egress_apply(golden_home, gw_repo, "wider", nspawn_vm, "--apply")
    assert rc == 0, out
    assert (out["applied"], out["plan_digest"], out["to"]) == (True, plan["plan_digest"], plan["to"])
    print(f"egress apply: new generation in force in {out['reload_s']} s")
    receipt = receipt_of(golden_home, out["receipts"]["apply"])
    failed = [c for c in receipt["checks"] if not c["ok"]]
    assert failed == []
    assert "agents-not-restarted" in {c["name"] for c in receipt["checks"]}
    after = on_host(
        golden_home, nspawn_vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw"
    )
    assert after == pid
    assert as_agent(golden_home, nspawn_vm, "/v2/things")["status"] == 200
    with SshTransport.from_target(inventory.load(golden_home, nspawn_vm)) as ssh:
        in_force = gatewaycheck.read_in_force(ssh)
    new_clusters = receipt["observations"]["gateway"]["cds_version"]
    assert (in_force["lds"], in_force["cds"]) == (out["to"], new_clusters)
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, doc  # status compares with the gateway the egress apply left


def test_egress_log_shows_the_gateways_events_and_follows_new_ones(golden_home: Home, nspawn_vm: str) -> None:
    rc, doc = avm(golden_home, "egress", "log", "--target", nspawn_vm)
    assert rc == 0, doc
    v2 = [
        (e["event"], e["code"], e["reason"], e["profile"]) for e in doc["events"] if e["path"] == "/v2/things"
    ]
    # denied under the first policy, allowed after the hot reload
    assert v2 == [("egress.denied", 403, "path-not-allowed", "gw"), ("egress.allowed", 200, "allowed", "gw")]
    argv = [
        *AVM,
        "--home",
        str(golden_home.root),
        "--json",
        "egress",
        "log",
        "--target",
        nspawn_vm,
        "--follow",
    ]
    follow = subprocess.Popen(
        argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "AVM_HOME": str(golden_home.root)}
    )
    guard = threading.Timer(120, follow.kill)  # never hang: a killed follower ends the loop below
    guard.start()
    try:
        assert as_agent(golden_home, nspawn_vm, "/v1/followed")["status"] == 200
        assert follow.stdout is not None
        seen = []
        for line in follow.stdout:  # the last events first, then the new one as it is logged
            seen.append(json.loads(line))
            if seen[-1]["path"] == "/v1/followed":
                break
        assert (seen[-1]["event"], seen[-1]["code"]) == ("egress.allowed", 200)
    finally:
        guard.cancel()
        follow.kill()
        follow.wait()


def test_usage_counts_the_agents_requests_and_status_records_them(
    golden_home: Home, nspawn_vm: str, applied: Any
) -> None:
    since = usage.since_stamp("0s")  # the VM is a container: its clock is this one
    got = [as_agent(golden_home, nspawn_vm, p) for p in ("/v1/chat/completions",) * 2 + ("/v3/nope",)]
    assert [g["status"] for g in got] == [200, 200, 403]
    doc: dict[str, Any] = {}
    for _ in range(40):  # Envoy flushes its access log on an interval
        rc, doc = avm(golden_home, "usage", "--target", nspawn_vm, "--since", since)
        assert rc == 0, doc
        if doc["totals"]["requests"] == 3:
            break
        time.sleep(0.25)
    [row] = doc["rows"]
    assert {k: v for k, v in row.items() if k not in ("first", "last")} == {
        "identity": "profile:gw",
        "destination": "api.example.test",
        "requests": 3,
        "allowed": 2,
        "denied": 1,
        "denied_by": {"path-not-allowed": 1},
        "bytes_sent": 0,  # GETs: no request body
        "bytes_received": sum(g["bytes"] for g in got),
        "input_tokens": 0,  # the test upstream reports the request body's length
        "output_tokens": 2 * 7,
    }
    rc, out = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, out
    recorded = newest(golden_home, "status")["result"]["usage"]
    rc, again = avm(golden_home, "usage", "--target", nspawn_vm, "--since", recorded["since"])
    assert rc == 0, again
    assert (recorded["rows"], recorded["totals"]) == (again["rows"], again["totals"])
    # since the apply: the earlier tests' requests too, so at least these three
    assert recorded["totals"]["output_tokens"] >= 14
    table = run_avm(golden_home, "usage", "--target", nspawn_vm, "--since", since)
    assert table.returncode == 0
    assert table.stdout.splitlines()[1].split()[:4] == ["profile:gw", "api.example.test", "3", "1"]


def test_the_receipts_with_the_probes_and_events_verify(golden_home: Home, applied: Any) -> None:
    rc, doc = avm(golden_home, "receipts", "verify")
    assert rc == 0, doc
    assert newest(golden_home, "apply")["status"] == "ok"  # the egress apply, checks included


def test_the_credential_is_the_gateways_only(
    golden_home: Home, nspawn_vm: str, applied: Any, gw_repo: dict[str, Any], tmp_path: Path
) -> None:
    value = gw_repo["secret"]
    stat = on_host(
        golden_home, nspawn_vm, "stat", "-c", "%a %U %G", "/etc/avm/gateway/secrets/gw-upstream-key"
    )
    assert stat.strip() == "640 root avm-gateway"
    assert (
        on_host(golden_home, nspawn_vm, "stat", "-c", "%a %U %G", "/etc/avm/gateway").strip()
        == "750 root avm-gateway"
    )
    # the agent user cannot read it
    read = on_host(
        golden_home,
        nspawn_vm,
        "setpriv",
        "--reuid",
        "agent-gw",
        "--regid",
        "agent-gw",
        "--clear-groups",
        "cat",
        "/etc/avm/gateway/secrets/gw-upstream-key",
        check=False,
    )
    assert value.decode() not in read
    pid = on_host(
        golden_home, nspawn_vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw"
    ).strip()
    agent = on_host(
        golden_home,
        nspawn_vm,
        "sh",
        "-c",
        f"cat /proc/{pid}/environ; ls -R /run/credentials/agent-gateway@gw.service 2>/dev/null; "
        f"cat /etc/systemd/system/agent-gateway@gw.service.d/avm.conf; journalctl --no-pager -q",
    )
    assert "SSL_CERT_FILE=/etc/avm/boundary/egress-ca.pem" in agent
    assert "LoadCredential" not in agent
    export = tmp_path / "receipts.jsonl"
    assert avm(golden_home, "receipts", "export", "--out", str(export))[0] == 0
    artifacts = {"agent": agent.encode(), "export": export.read_bytes(), "cli": "".join(OUTPUTS).encode()}
    for path in sorted(golden_home.receipts.glob("*.json")):
        raw = path.read_bytes()
        artifacts[path.name] = raw + base64.b64decode(json.loads(raw)["payload"])
    for path in sorted(golden_home.root.rglob("*")):  # the control plane's files, but its secret store
        rel = path.relative_to(golden_home.root)
        if rel.parts[0] != "secrets" and path.is_file() and path.stat().st_size < 2**25:
            artifacts[f"home/{rel}"] = path.read_bytes()
    leaked = [name for name, data in artifacts.items() if value in data]
    assert leaked == [], f"credential value found in {leaked}"
    # every file the agent user can read from inside its unit (root finds the gateway's copy)
    where = ["/etc", "/opt", "/var", "/run", "/tmp", "/usr/local", "/root", "/home"]
    sweep = ["grep", "-rlsF", "--exclude-dir=proc", "--exclude-dir=sys", value.decode(), *where]
    as_root = on_host(golden_home, nspawn_vm, *sweep, check=False).split()
    assert as_root == ["/etc/avm/gateway/secrets/gw-upstream-key"]
    # only leaves go to the host: the egress CA's key stays in the avm home (0600)
    ca_key = gateway.target_dir(golden_home, nspawn_vm) / "ca" / "ca.key"
    assert ca_key.stat().st_mode & 0o777 == 0o600
    body = ca_key.read_text().splitlines()[1]
    ca_sweep = ["grep", "-rlsF", "--exclude-dir=proc", "--exclude-dir=sys", body, *where]
    assert on_host(golden_home, nspawn_vm, *ca_sweep, check=False).split() == []
    argv = ["nsenter", "-t", pid, "-m", "--", "setpriv", "--reuid", "agent-gw", "--regid", "agent-gw"]
    assert on_host(golden_home, nspawn_vm, *argv, "--clear-groups", *sweep, check=False).split() == []


def test_a_promotion_without_names_removes_the_gateway_and_its_credentials(
    golden_home: Home, gw_repo: dict[str, Any], nspawn_vm: str, applied: Any
) -> None:
    rc, doc = promote(golden_home, gw_repo, "plain", nspawn_vm, "--apply")
    assert rc == 0, doc
    check = next(
        c
        for c in receipt_of(golden_home, doc["receipts"]["apply"])["checks"]
        if c["name"] == "gateway-removed"
    )
    assert check["ok"] is True, check
    assert (
        on_host(golden_home, nspawn_vm, "systemctl", "is-active", "avm-gateway", check=False).strip()
        == "inactive"
    )
    assert on_host(golden_home, nspawn_vm, "ls", "/etc/avm", check=False).strip() == ""
    dropin = on_host(golden_home, nspawn_vm, "cat", "/etc/systemd/system/agent-gateway@gw.service.d/avm.conf")
    assert "BindReadOnlyPaths" not in dropin and "avm-boundary" not in dropin
    net = inventory.load(golden_home, nspawn_vm).meta["network"]["netns"]
    listed = subprocess.run(
        ["ip", "netns", "exec", net, "nft", "list", "tables"], capture_output=True, text=True
    )
    assert "avm_boundary" not in listed.stdout and "avm_egress" in listed.stdout
