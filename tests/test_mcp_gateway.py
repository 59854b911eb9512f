"""The example gateway's fail-closed MCP tool allowlist, over real JSON-RPC 2.0 on HTTP.

The gateway (examples/hello-agent/agent.py + mcp_guard.py) runs as a real process with the
policy file avm renders for a profile; the tests speak MCP to it the way a client would.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.promote import render
from controlplane.release.manifest import parse_manifest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello-agent"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _policy(tmp_path: Path, mutate: Any = None) -> Path:
    manifest = parse_manifest((EXAMPLE / "avm.yaml").read_bytes())
    doc = json.loads(render.policy_file(manifest.profile("web")))
    if mutate is not None:
        mutate(doc)
    path = tmp_path / "web.policy.json"
    path.write_text(json.dumps(doc))
    return path


def _start(policy: Path, port: int) -> subprocess.Popen[str]:
    env = {
        "GATEWAY_PORT": str(port),
        "AGENT_POLICY": str(policy),
        "AGENT_PROFILE": "web",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.Popen(
        [sys.executable, "agent.py"], cwd=EXAMPLE, env=env, stderr=subprocess.PIPE, text=True
    )


class Gateway:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc, self.port, self.next_id = proc, port, 0

    def rpc(self, method: str, params: dict[str, Any] | None = None, *, notify: bool = False) -> Any:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not notify:
            self.next_id += 1
            msg["id"] = self.next_id
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/mcp",
            data=json.dumps(msg).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - http to a local gateway
            body = resp.read()
            return resp.status if notify else json.loads(body)

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        return err


def _serve(policy: Path) -> Gateway:
    port = _free_port()
    proc = _start(policy, port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return Gateway(proc, port)
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise AssertionError(  # noqa: B904 - the gateway's exit is the cause, not the URL error
                    f"gateway exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
                )
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("gateway did not start")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = _serve(_policy(tmp_path))
    yield gw
    gw.stop()


def test_mcp_session_lists_only_allowed_tools_and_denies_the_rest(gateway: Gateway) -> None:
    init = gateway.rpc("initialize", {"protocolVersion": "2025-03-26", "capabilities": {}})
    assert init["result"]["capabilities"]["tools"] is not None
    assert gateway.rpc("notifications/initialized", notify=True) == 202
    listed = [t["name"] for t in gateway.rpc("tools/list")["result"]["tools"]]
    assert listed == ["search", "summarize"]  # delete_records is implemented but not allowed: absent
    ok = gateway.rpc("tools/call", {"name": "search", "arguments": {"query": "q"}})
    assert ok["result"]["content"][0]["text"].startswith("hello")
    for tool, reason in (("delete_records", "not-allowed"), ("rm_rf", "unknown-tool")):
        denied = gateway.rpc("tools/call", {"name": tool, "arguments": {}})
        assert denied["error"]["code"] == -32602 and denied["error"]["data"]["reason"] == reason
    assert gateway.rpc("no/such")["error"]["code"] == -32601
    events = [
        json.loads(ln.split("avm-event ", 1)[1]) for ln in gateway.stop().splitlines() if "avm-event " in ln
    ]
    assert {(e["type"], e["tool"], e["reason"]) for e in events} == {
        ("tool.denied", "delete_records", "not-allowed"),
        ("tool.denied", "rm_rf", "unknown-tool"),
    }


def test_schema_hash_mismatch_fails_closed(tmp_path: Path) -> None:
    def pin_other_schema(doc: dict[str, Any]) -> None:
        for tool in doc["tools"]["allow"]:
            if tool["name"] == "summarize":
                tool["schema_sha256"] = "0" * 64

    gw = _serve(_policy(tmp_path, pin_other_schema))
    try:
        assert [t["name"] for t in gw.rpc("tools/list")["result"]["tools"]] == ["search"]
        denied = gw.rpc("tools/call", {"name": "summarize", "arguments": {"text": "x"}})
        assert denied["error"]["data"]["reason"] == "schema-mismatch"
    finally:
        err = gw.stop()
    assert '"reason": "schema-mismatch"' in err


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[key]
    doc[last] = value


@pytest.mark.parametrize(
    "case",
    ["missing", "not-json", "default-allow", "version-2", "allow-not-a-list", "extra-key", "bad-hash"],
)
def test_invalid_or_unreadable_policy_refuses_to_serve(case: str, tmp_path: Path) -> None:
    mutations = {
        "default-allow": ("tools.default", "allow"),
        "version-2": ("version", 2),
        "allow-not-a-list": ("tools.allow", "*"),
        "extra-key": ("tools.allow", [{"name": "search", "schema_sha256": "a" * 64, "any": True}]),
        "bad-hash": ("tools.allow", [{"name": "search", "schema_sha256": "xyz"}]),
    }
    policy = _policy(tmp_path, (lambda d: _set(d, *mutations[case])) if case in mutations else None)
    if case == "missing":
        policy.unlink()
    elif case == "not-json":
        policy.write_text("{ corrupted")
    port = _free_port()
    proc = _start(policy, port)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 78, err  # EX_CONFIG, before any socket was bound
    assert '"type": "gateway.refused"' in err
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
