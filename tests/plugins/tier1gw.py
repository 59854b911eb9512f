"""The Tier-1 gateway tests' parts (tests/test_gateway_nspawn.py, tests/test_requests_nspawn.py):
an agent repo whose profile lists ``api.example.test`` by name, the test upstream on the VM's
veth host end with its own CA (which only the gateway trusts), and requests made as the agent
from inside its unit (HTTPS through the gateway, HTTP to ``avm.boundary``).
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
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
from controlplane.promote import gatewaycheck
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
# the same destination held for the content classifier, with a ceiling a card number exceeds
INSPECTED_ENTRY = {**NAME_ENTRY, "max_sensitivity": "internal", "inspect": True}
# the example MCP tool server, listed as an MCP server: the profile's tools: are its allowlist
MCP_ENTRY = {"host": "tools.example.test", "port": 443, "methods": ["POST"], "paths": ["/mcp"], "mcp": True}
MCP_URL = "https://tools.example.test/mcp"
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
        ("inspected", _manifest(egress=[INSPECTED_ENTRY])),
        (
            "mcp",
            _manifest(egress=[NAME_ENTRY, MCP_ENTRY], env={"GATEWAY_PORT": str(PORT), "MCP_SERVER": MCP_URL}),
        ),
    ):
        (path / "avm.yaml").write_text(text)
        commits[name] = _commit(path, name)
    key_dir = root / "release-key"
    _, key, pub = signing.release_init(key_dir, PASSWORD)
    signing.trust_release_key(golden_home, pub, "release")
    for name in ("good", "l3", "l3-leak", "wider", "plain", "inspected", "mcp"):
        signing.sign_release(golden_home, path, commits[name], key, PASSWORD)
    value = b"gwkey-" + os.urandom(20).hex().encode()
    secrets.put(golden_home, REF, value)
    return {"path": path, "commits": commits, "secret": value, "key": key}


@contextlib.contextmanager
def serve_upstream(
    root: Path, home: Home, vm: str, *, listen: str, reach: str, port: int
) -> Iterator[dict[str, Any]]:
    """``api.example.test`` (a CA of its own, which only the gateway trusts) on ``listen:port``
    of this machine, which the VM ``vm`` reaches at ``reach:port``: the target's gateway options
    pin the name there. A name the host resolves (``outside.example.test`` -> ``reach``) is the
    unlisted-name probe's control. Yields ``log`` (the requests the upstream saw), ``addr``
    (``reach``) and ``port``."""
    ca = EgressCA.ensure(root / "ca", common_name="upstream test CA")
    cert, key = ca.leaf("api.example.test")
    log = root / "requests.jsonl"
    argv = [sys.executable, "-m", "tests.plugins.upstream_server", listen, str(port)]
    proc = subprocess.Popen(
        [*argv, str(cert), str(key), str(log)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        pin = f"api.example.test:443={reach}:{port}"
        rc, out = avm(home, "egress", "options", "--target", vm, "--clear",
                      "--upstream-ca", str(ca.cert_path), "--pin", pin)  # fmt: skip
        assert rc == 0, out
        # a name the host resolves (the unlisted-name probe's control): the sandbox must not
        on_host(home, vm, "sh", "-c", f"echo '{reach} outside.example.test' >> /etc/hosts")
        yield {"log": log, "addr": reach, "port": port, "ca": ca}
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def gw_upstream(
    tmp_path_factory: pytest.TempPathFactory, golden_home: Home, nspawn_vm: str
) -> Iterator[dict[str, Any]]:
    """The nspawn VM's upstream: on the VM's veth host end, a link the test's VM owns."""
    net = host_network(inventory.load(golden_home, nspawn_vm))
    assert net is not None
    port = 47000 + int.from_bytes(os.urandom(2)) % 1000
    root = tmp_path_factory.mktemp("upstream")
    with serve_upstream(
        root, golden_home, nspawn_vm, listen=net.host_addr, reach=net.host_addr, port=port
    ) as up:
        yield up


@pytest.fixture(scope="module")
def mcp_upstream(
    tmp_path_factory: pytest.TempPathFactory, golden_home: Home, nspawn_vm: str, gw_upstream: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """The example MCP tool server (``tools.example.test``, the upstream's CA) beside the upstream,
    its descriptors in a file the test may change, every request it gets logged."""
    tmp = tmp_path_factory.mktemp("mcp-upstream")
    cert, key = gw_upstream["ca"].leaf("tools.example.test")  # gw_upstream's own test CA
    root = Path(__file__).resolve().parents[2]
    server = root / "examples" / "mcp-tools" / "tools_server.py"
    tools = runpy.run_path(str(server))["TOOLS"]
    tools_file, log = tmp / "tools.json", tmp / "tools.jsonl"
    tools_file.write_text(json.dumps(tools))
    port = gw_upstream["port"] + 1
    argv = [sys.executable, str(server), gw_upstream["addr"], str(port), "--tls", str(cert), str(key)]
    proc = subprocess.Popen(
        [*argv, "--log", str(log), "--tools", str(tools_file)], stdout=subprocess.PIPE, cwd=root
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        pin = f"tools.example.test:443={gw_upstream['addr']}:{port}"
        rc, out = avm(golden_home, "egress", "options", "--target", nspawn_vm, "--pin", pin)
        assert rc == 0, out
        yield {"log": log, "tools": tools, "tools_file": tools_file}
    finally:
        proc.kill()
        proc.wait()


# one JSON-RPC message to the MCP server as the agent sends it: no mcp_guard, a bare client
AGENT_MCP = r"""
import http.client, json, ssl, sys
ctx = ssl.create_default_context(cafile="/etc/avm/boundary/egress-ca.pem")
try:
    conn = http.client.HTTPSConnection("tools.example.test", 443, context=ctx, timeout=10)
    head = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    conn.request("POST", "/mcp", body=sys.argv[1].encode(), headers=head)
    resp = conn.getresponse()
    raw = resp.read()
    is_json = resp.getheader("content-type", "").startswith("application/json")
    print(json.dumps({"status": resp.status, "body": json.loads(raw) if is_json else None}))
except (OSError, ValueError) as exc:
    print(json.dumps({"error": type(exc).__name__ + ": " + str(exc)}))
"""


def as_agent_mcp(home: Home, vm: str, message: dict[str, Any]) -> dict[str, Any]:
    pid = on_host(home, vm, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@gw").strip()
    argv = ["nsenter", "-t", pid, "-m", "-n", "--", "setpriv", "--reuid", "agent-gw", "--regid", "agent-gw"]
    out = on_host(home, vm, *argv, "--clear-groups", "python3", "-c", AGENT_MCP, json.dumps(message))
    doc: dict[str, Any] = json.loads(out)
    return doc


def ask_agent(home: Home, vm: str, query: str) -> dict[str, Any]:
    """The example agent's own ``GET /use?...`` (it calls the tool through the boundary)."""
    fetch = (
        "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())"
    )
    out = on_host(home, vm, "python3", "-c", fetch, f"http://127.0.0.1:{PORT}/use?{query}")
    doc: dict[str, Any] = json.loads(out)
    return doc


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
    denied = doc.get("reason") if doc.get("denied") else None
    print(json.dumps({"status": resp.status, "reason": denied, "bytes": len(body)}))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__ + ": " + str(exc)}))
"""


def agent_argv(home: Home, vm: str, *, cgroup: bool = False, netns_only: bool = False) -> list[str]:
    """argv that runs a command as the agent ``agent-gw``: inside its running unit's mount and
    network namespaces; ``cgroup``: also in the unit's own cgroup (so under its ``IPAddressDeny=``
    cgroup-BPF, which a real kernel enforces); ``netns_only``: only its network namespace and
    uid, in the SSH session's cgroup (the boundary table is all that judges it there)."""
    unit = "agent-gateway@gw"
    pid = on_host(home, vm, "systemctl", "show", "-p", "MainPID", "--value", unit).strip()
    spaces = ["-n"] if netns_only else ["-m", "-n"]
    argv = ["nsenter", "-t", pid, *spaces, "--", "setpriv", "--reuid", "agent-gw", "--regid", "agent-gw"]
    argv.append("--clear-groups")
    if not cgroup:
        return argv
    group = on_host(home, vm, "systemctl", "show", "-p", "ControlGroup", "--value", unit).strip()
    join = 'echo $$ > "/sys/fs/cgroup$1/cgroup.procs" && shift && exec "$@"'
    return ["sh", "-c", join, "sh", group, *argv]


def as_agent(
    home: Home, vm: str, path: str, forged: str = "forged", *, cgroup: bool = False
) -> dict[str, Any]:
    argv = agent_argv(home, vm, cgroup=cgroup)
    out = on_host(home, vm, *argv, "python3", "-c", AGENT_REQUEST, "api.example.test", path, forged)
    doc: dict[str, Any] = json.loads(out)
    return doc


# a POST as the agent with a body and headers of its choosing; prints status, reason, verdict headers
AGENT_POST = r"""
import http.client, json, ssl, sys
path, body, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ctx = ssl.create_default_context(cafile="/etc/avm/boundary/egress-ca.pem")
try:
    conn = http.client.HTTPSConnection("api.example.test", 443, context=ctx, timeout=10)
    conn.request("POST", path, body=body.encode(), headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    doc = json.loads(raw) if resp.getheader("content-type", "").startswith("application/json") else {}
    print(json.dumps({"status": resp.status, "reason": doc.get("reason") if doc.get("denied") else None,
                      "findings": resp.getheader("x-avm-findings")}))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__ + ": " + str(exc)}))
"""


def post_as_agent(home: Home, vm: str, path: str, body: str, **headers: str) -> dict[str, Any]:
    out = on_host(
        home, vm, *agent_argv(home, vm), "python3", "-c", AGENT_POST, path, body, json.dumps(headers)
    )
    doc: dict[str, Any] = json.loads(out)
    return doc


def agent_python(home: Home, vm: str, script: str, *args: str, check: bool = True) -> str:
    """``python3 -c script args`` as the agent user, inside its running unit's mount and network
    namespaces: its hosts file, its CA bundle, its boundary table."""
    return on_host(home, vm, *agent_argv(home, vm), "python3", "-c", script, *args, check=check)


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
