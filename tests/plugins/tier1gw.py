"""The Tier-1 gateway tests' parts (tests/test_gateway_nspawn.py, tests/test_requests_nspawn.py):
an agent repo whose profile lists ``api.example.test`` by name, the test upstream on the VM's
veth host end with its own CA (which only the gateway trusts), and requests made as the agent
from inside its unit (HTTPS through the gateway, HTTP to ``avm.boundary``).
"""

from __future__ import annotations

import json
import os
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
from controlplane.promote import gateway, gatewaycheck
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
def gw_repo(tmp_path_factory: pytest.TempPathFactory, golden_home: Home) -> dict[str, Any]:
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
        ("plain", _manifest(egress=[])),
    ):
        (path / "avm.yaml").write_text(text)
        commits[name] = _commit(path, name)
    key_dir = root / "release-key"
    _, key, pub = signing.release_init(key_dir, PASSWORD)
    signing.trust_release_key(golden_home, pub, "release")
    for name in ("good", "l3", "l3-leak", "wider", "plain"):
        signing.sign_release(golden_home, path, commits[name], key, PASSWORD)
    value = b"gwkey-" + os.urandom(20).hex().encode()
    secrets.put(golden_home, REF, value)
    return {"path": path, "commits": commits, "secret": value, "key": key}


@pytest.fixture(scope="module")
def gw_upstream(
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
        cwd=Path(__file__).resolve().parents[2],
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
    doc: dict[str, Any] = json.loads(agent_python(home, vm, AGENT_REQUEST, "api.example.test", path, forged))
    return doc


def agent_python(home: Home, vm: str, script: str, *args: str, check: bool = True) -> str:
    """``python3 -c script args`` as the agent user, inside its running unit's mount and network
    namespaces: its hosts file, its CA bundle, its boundary table."""
    pid = on_host(home, vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw").strip()
    argv = ["nsenter", "-t", pid, "-m", "-n", "--", "setpriv", "--reuid", "agent-gw", "--regid", "agent-gw"]
    return on_host(home, vm, *argv, "--clear-groups", "python3", "-c", script, *args, check=check)


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


# one HTTP(S) request as the agent (tests/test_requests_nspawn.py); prints the status and the
# JSON body when the gateway itself answered (a denial, or avm.boundary): an upstream's echo (it
# holds the credential) never
ASK = r"""
import http.client, json, ssl, sys
r = json.loads(sys.argv[1])
try:
    if r["scheme"] == "https":
        ctx = ssl.create_default_context(cafile="/etc/avm/boundary/egress-ca.pem")
        conn = http.client.HTTPSConnection(r["host"], 443, context=ctx, timeout=5)
    else:
        conn = http.client.HTTPConnection(r["host"], 80, timeout=5)
    body = r.get("body")
    data = body.encode() if body is not None else None
    conn.request(r["method"], r["path"], body=data, headers=r.get("headers", {}))
    resp = conn.getresponse()
    raw = resp.read()
    doc = json.loads(raw) if resp.getheader("content-type", "").startswith("application/json") else None
    own = r["host"] == "avm.boundary" or (isinstance(doc, dict) and doc.get("denied") is True)
    print(json.dumps({"status": resp.status, "doc": doc if own else None}))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__ + ": " + str(exc)}))
"""


def agent(home: Home, vm: str, **req: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(agent_python(home, vm, ASK, json.dumps(req)))
    return doc


def ask(home: Home, vm: str, body: str, **headers: str) -> dict[str, Any]:
    return agent(
        home,
        vm,
        scheme="http",
        host="avm.boundary",
        method="POST",
        path="/requests",
        body=body,
        headers=headers,
    )


def in_force(home: Home, vm: str) -> dict[str, Any]:
    with SshTransport.from_target(inventory.load(home, vm)) as ssh:
        return gatewaycheck.read_in_force(ssh)


def main_pid(home: Home, vm: str) -> str:
    return on_host(home, vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw").strip()
