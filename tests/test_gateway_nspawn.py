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
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.boundary.ca import EgressCA
from controlplane.governance import secrets
from controlplane.home import Home
from controlplane.promote import gateway
from controlplane.promote.enforcement import host_network
from controlplane.release import trust as signing
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from tests.plugins.agentrepo import PASSWORD, _commit, copy_example, git
from tests.plugins.vms import run_avm

PORT = 18091
REF = "secret://local/gw-upstream-key"
SEARCH = "f590c569413b140e00c4f7239e66819edaffac388d3a189b6b7e256f5e3a4daf"
NAME_ENTRY = {
    "host": "api.example.test",
    "port": 443,
    "methods": ["GET", "POST"],
    "paths": ["/v1/*"],
    "credential": {"header": "x-api-key", "ref": REF},
}
OUTPUTS: list[str] = []  # every CLI output of the module, for the leak sweep


def _manifest(tier: str = "L1", egress: list[Any] | None = None, **extra: Any) -> str:
    profile = {
        "name": "gw",
        "risk_tier": tier,
        "entrypoint": ["python3", "agent.py"],
        "env": {"GATEWAY_PORT": str(PORT)},
        "tools": [{"name": "search", "schema_sha256": SEARCH}],
        "egress": egress if egress is not None else [NAME_ENTRY],
        "health": {"port": PORT, "path": "/healthz", "timeout_s": 20},
        **extra,
    }
    return yaml.safe_dump({"soak_s": 60, "profiles": [profile]})


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, golden_home: Home) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gw")
    path = root / "gw-agent"
    copy_example(path)
    git(path, "init", "-q", "-b", "main")
    commits = {}
    for name, text in (
        ("good", _manifest()),
        ("wildcard", _manifest(egress=[{**NAME_ENTRY, "host": "*"}])),
        ("l3", _manifest("L3", canary=True)),
        ("l3-leak", _manifest("L3", canary=True, secrets={"API_KEY": REF})),
        ("wider", _manifest(egress=[{**NAME_ENTRY, "paths": ["/v1/*", "/v2/*"]}])),
    ):
        (path / "avm.yaml").write_text(text)
        commits[name] = _commit(path, name)
    key_dir = root / "release-key"
    _, key, pub = signing.release_init(key_dir, PASSWORD)
    signing.trust_release_key(golden_home, pub, "release")
    for name in ("good", "l3", "l3-leak", "wider"):
        signing.sign_release(golden_home, path, commits[name], key, PASSWORD)
    value = b"gwkey-" + os.urandom(20).hex().encode()
    secrets.put(golden_home, REF, value)
    return {"path": path, "commits": commits, "secret": value, "key": key}


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory, golden_home: Home, nspawn_vm: str
) -> Iterator[dict[str, Any]]:
    """``api.example.test`` on the VM's veth host end, with a CA of its own the gateway trusts."""
    net = host_network(inventory.load(golden_home, nspawn_vm))
    assert net is not None
    tmp = tmp_path_factory.mktemp("upstream")
    ca = EgressCA.ensure(tmp / "ca", common_name="upstream test CA")
    cert, key = ca.leaf("api.example.test")
    log = tmp / "requests.jsonl"
    port = 47000 + int.from_bytes(os.urandom(2)) % 1000
    argv = [sys.executable, "-m", "tests.plugins.upstream_server", net.host_addr, str(port)]
    proc = subprocess.Popen(
        [*argv, str(cert), str(key), str(log)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        options = gateway.target_dir(golden_home, nspawn_vm) / "gateway.json"
        options.parent.mkdir(parents=True, exist_ok=True)
        pins = {"api.example.test:443": [net.host_addr, port]}
        options.write_text(json.dumps({"upstream_ca": str(ca.cert_path), "upstreams": pins}))
        # a name the host resolves (the unlisted-name probe's control): the sandbox must not
        on_host(
            golden_home, nspawn_vm, "sh", "-c", f"echo '{net.host_addr} outside.example.test' >> /etc/hosts"
        )
        yield {"log": log, "addr": net.host_addr, "port": port}
    finally:
        proc.kill()
        proc.wait()


def avm(home: Home, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    out = run_avm(home, "--json", *args, env=env)
    OUTPUTS.extend([out.stdout, out.stderr])
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {"stderr": out.stderr}


def promote(home: Home, r: dict[str, Any], commit: str, vm: str, *extra: str) -> tuple[int, dict[str, Any]]:
    return avm(
        home, "promote", "--repo", str(r["path"]), "--commit", r["commits"][commit], "--target", vm, *extra
    )


def on_host(home: Home, vm: str, *argv: str, check: bool = True) -> str:
    with SshTransport.from_target(inventory.load(home, vm)) as ssh:
        result = ssh.run(list(argv), timeout=120)
    out = (result.check() if check else result).stdout
    OUTPUTS.append(out)
    return out


def receipt_of(home: Home, seq: str) -> dict[str, Any]:
    return avm(home, "receipts", "show", seq)[1]["statement"]["predicate"]  # type: ignore[no-any-return]


def test_a_wildcard_alone_is_refused_before_signing_at_exit_64(
    golden_home: Home, repo: dict[str, Any]
) -> None:
    sha = repo["commits"]["wildcard"]
    env = {"COSIGN_PASSWORD": PASSWORD.decode()}
    rc, doc = avm(
        golden_home, "sign", "--repo", str(repo["path"]), "--commit", sha, "--key", str(repo["key"]), env=env
    )
    assert rc == 64, doc
    assert doc["error"]["code"] == "egress-name-wildcard"
    assert doc["error"]["details"] == {
        "expected": "an exact name or '*.' + a name (a wildcard of the first label only)",
        "actual": "*",
    }
    assert not signing.signature_path(golden_home, sha).exists()


def test_a_secret_injected_and_also_handed_to_the_agent_fails_credentials_at_boundary(
    golden_home: Home, repo: dict[str, Any], nspawn_vm: str
) -> None:
    rc, doc = promote(golden_home, repo, "l3-leak", nspawn_vm)
    assert rc == 3, doc
    assert doc["error"]["code"] == "tier-controls-missing"
    assert doc["error"]["details"]["profile gw"]["missing"] == ["rollback-drill", "credentials-at-boundary"]
    reason = doc["error"]["details"]["profile gw"]["reasons"]["credentials-at-boundary"]
    assert reason == f"secret API_KEY ({REF}) is injected by the gateway and also handed to the agent"
    # the same profile without the secret under secrets: passes this control (only the drill is missing)
    rc, doc = promote(golden_home, repo, "l3", nspawn_vm)
    assert rc == 3, doc
    assert doc["error"]["details"]["profile gw"]["missing"] == ["rollback-drill"]
    assert on_host(golden_home, nspawn_vm, "ls", "/etc/avm", check=False).strip() == ""  # nothing written


@pytest.fixture(scope="module")
def applied(
    golden_home: Home, repo: dict[str, Any], nspawn_vm: str, upstream: dict[str, Any]
) -> dict[str, Any]:
    rc, doc = promote(golden_home, repo, "good", nspawn_vm, "--apply")
    assert rc == 0, doc
    return receipt_of(golden_home, doc["receipts"]["apply"])


def test_apply_starts_the_gateway_and_the_probes_see_the_boundary_in_force(
    golden_home: Home, applied: dict[str, Any], upstream: dict[str, Any], repo: dict[str, Any]
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
    assert in_force["lds"] == in_force["cds"] == applied["observations"]["gateway"]["generation"]
    # the upstream saw the probe's request with the injected credential, and only that value
    seen = [json.loads(line) for line in upstream["log"].read_text().splitlines()]
    assert [r["path"] for r in seen] == ["/v1/avm-probe"]
    assert [v for k, v in seen[0]["headers"] if k == "x-api-key"] == [repo["secret"].decode()]


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


# an HTTPS request as the agent, from inside its running unit's mount and network namespaces
AGENT_REQUEST = r"""
import http.client, json, ssl, sys
host, path, forged = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile="/etc/avm/boundary/egress-ca.pem")
try:
    conn = http.client.HTTPSConnection(host, 443, context=ctx, timeout=5)
    conn.request("GET", path, headers={"x-api-key": forged})
    resp = conn.getresponse()
    body = resp.read()  # the test upstream echoes the request: never printed (it holds the credential)
    doc = json.loads(body) if resp.getheader("content-type", "").startswith("application/json") else {}
    print(json.dumps({"status": resp.status, "reason": doc.get("reason") if doc.get("denied") else None}))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__ + ": " + str(exc)}))
"""


def as_agent(home: Home, vm: str, path: str, forged: str = "forged") -> dict[str, Any]:
    pid = on_host(home, vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw").strip()
    argv = ["nsenter", "-t", pid, "-m", "-n", "--", "setpriv", "--reuid", "agent-gw", "--regid", "agent-gw"]
    out = on_host(
        home, vm, *argv, "--clear-groups", "python3", "-c", AGENT_REQUEST, "api.example.test", path, forged
    )
    doc: dict[str, Any] = json.loads(out)
    return doc


def test_a_forged_credential_header_is_replaced(
    golden_home: Home, nspawn_vm: str, applied: Any, upstream: dict[str, Any], repo: dict[str, Any]
) -> None:
    got = as_agent(golden_home, nspawn_vm, "/v1/messages", forged="agent-made-this-up")
    assert got["status"] == 200, got
    seen = json.loads(upstream["log"].read_text().splitlines()[-1])
    assert seen["path"] == "/v1/messages"
    assert [v for k, v in seen["headers"] if k == "x-api-key"] == [repo["secret"].decode()]


def test_the_gateway_stopped_lets_nothing_out_and_restarted_serves_the_same_generation(
    golden_home: Home, nspawn_vm: str, applied: Any, upstream: dict[str, Any]
) -> None:
    generation = applied["observations"]["gateway"]["generation"]
    before = len(upstream["log"].read_text().splitlines())
    on_host(golden_home, nspawn_vm, "systemctl", "stop", "avm-gateway")
    try:
        got = as_agent(golden_home, nspawn_vm, "/v1/messages")
        assert got["error"].startswith("ConnectionRefusedError"), got  # nothing listens: no egress at all
        assert len(upstream["log"].read_text().splitlines()) == before
        rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
        assert rc == 2, doc
        whats = sorted(f["what"] for f in doc["findings"])
        assert whats == ["egress gateway unit", "egress policy generation in force"], doc["findings"]
    finally:
        on_host(golden_home, nspawn_vm, "systemctl", "start", "avm-gateway")
    in_force = gateway.wait_in_force(
        SshTransport.from_target(inventory.load(golden_home, nspawn_vm)), generation
    )
    assert (in_force["lds"], in_force["cds"]) == (generation, generation)
    assert as_agent(golden_home, nspawn_vm, "/v1/messages")["status"] == 200


def test_status_reports_a_changed_gateway_config_as_drift(
    golden_home: Home, nspawn_vm: str, applied: Any
) -> None:
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, doc
    assert doc["findings"] == []
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


def egress_apply(
    home: Home, r: dict[str, Any], commit: str, vm: str, *extra: str
) -> tuple[int, dict[str, Any]]:
    return avm(
        home,
        "egress",
        "apply",
        "--repo",
        str(r["path"]),
        "--commit",
        r["commits"][commit],
        "--target",
        vm,
        *extra,
    )


def newest(home: Home, kind: str) -> dict[str, Any]:
    from controlplane.evidence import reader

    for _, statement in reader.statements(home.receipts, newest_first=True):
        if statement.predicate.kind == kind:
            return statement.predicate.model_dump(mode="json")
    raise AssertionError(f"no {kind} receipt")


def test_a_rejected_egress_update_keeps_the_last_good_generation(
    golden_home: Home, repo: dict[str, Any], nspawn_vm: str, applied: Any, upstream: dict[str, Any]
) -> None:
    generation = applied["observations"]["gateway"]["generation"]
    options = gateway.target_dir(golden_home, nspawn_vm) / "gateway.json"
    good = options.read_text()
    doc = json.loads(good)
    options.write_text(json.dumps({**doc, "upstreams": {"api.example.test:443": ["not-an-address", 443]}}))
    try:
        rc, out = egress_apply(golden_home, repo, "wider", nspawn_vm, "--apply")
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
        in_force = gateway.read_in_force(ssh)
    assert (in_force["lds"], in_force["cds"]) == (generation, generation)
    assert as_agent(golden_home, nspawn_vm, "/v1/messages")["status"] == 200


def test_egress_apply_hot_reloads_without_restarting_the_agent(
    golden_home: Home, repo: dict[str, Any], nspawn_vm: str, applied: Any
) -> None:
    generation = applied["observations"]["gateway"]["generation"]
    denied = as_agent(golden_home, nspawn_vm, "/v2/things")
    assert (denied["status"], denied["reason"]) == (403, "path-not-allowed")
    pid = on_host(golden_home, nspawn_vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw")
    rc, plan = egress_apply(golden_home, repo, "wider", nspawn_vm)
    assert rc == 0, plan
    assert (plan["applied"], plan["from"]) == (False, generation)
    assert plan["to"] != generation
    rc, out = egress_apply(golden_home, repo, "wider", nspawn_vm, "--apply")
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
        in_force = gateway.read_in_force(ssh)
    assert (in_force["lds"], in_force["cds"]) == (out["to"], out["to"])
    rc, doc = avm(golden_home, "status", "--target", nspawn_vm)
    assert rc == 0, doc  # status compares with the gateway the egress apply left


def test_the_credential_is_the_gateways_only(
    golden_home: Home, nspawn_vm: str, applied: Any, repo: dict[str, Any], tmp_path: Path
) -> None:
    value = repo["secret"]
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
    argv = ["nsenter", "-t", pid, "-m", "--", "setpriv", "--reuid", "agent-gw", "--regid", "agent-gw"]
    assert on_host(golden_home, nspawn_vm, *argv, "--clear-groups", *sweep, check=False).split() == []
