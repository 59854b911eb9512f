"""A real microVM job that reaches a listed name through the host's egress gateway.

The guest (QEMU, the job network's tap and nftables table) gets a hosts file with only its
listed name, pointing at the gateway address on its own link, and the egress CA in its trust
bundle. Envoy runs in a "world" namespace this test makes (the host's uplink stand-in), next
to the test upstream ``api.example.test`` (its own test CA); the job's listener is bound inside
the job's namespace. The job's image carries openssl (a verifying TLS client) next to busybox.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane._internal.netns import delete_netns, netns_names
from controlplane.boundary.ca import EgressCA
from controlplane.governance import secrets as secret_store
from controlplane.transport.local import LocalTransport
from tests.plugins.jobimages import JobEnv, home_pids, run_through_gateway, tls_image
from tests.plugins.vms import run_avm

UPSTREAM = "198.51.100.40"
KEY = b"sk-job-" + secrets.token_hex(12).encode()
REF = "secret://local/job-api-key"


@pytest.fixture
def world(tmp_path: Path, root_net_tools: None) -> Iterator[tuple[str, int, EgressCA, Path]]:
    host, name = LocalTransport(), f"avmtgw-{secrets.token_hex(3)}-w"
    port = 47000 + secrets.randbelow(1000)
    up_ca = EgressCA.ensure(tmp_path / "upstream-ca", common_name="upstream test CA")
    cert, key = up_ca.leaf("api.example.test")
    log = tmp_path / "upstream.jsonl"
    host.run(["ip", "netns", "add", name]).check()
    proc = None
    try:
        host.run(["ip", "-n", name, "link", "set", "lo", "up"]).check()
        host.run(["ip", "-n", name, "addr", "add", f"{UPSTREAM}/32", "dev", "lo"]).check()
        argv = ["ip", "netns", "exec", name, sys.executable, "-m", "tests.plugins.upstream_server"]
        proc = subprocess.Popen(
            [*argv, UPSTREAM, str(port), str(cert), str(key), str(log), "--redact"],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield name, port, up_ca, log
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        delete_netns(host, name)
        assert name not in netns_names(host)


def script(port: int) -> str:
    ssl = (
        '/usr/bin/openssl s_client -quiet -verify_return_error -CAfile "$SSL_CERT_FILE" '
        f"-servername api.example.test -connect api.example.test:{port}"
    )
    req = "GET %s HTTP/1.1\\r\\nHost: api.example.test\\r\\nConnection: close\\r\\n\\r\\n"
    return "\n".join(
        [
            f"printf '{req}' /v1/models | {ssl} 2>/dev/null | tail -n 1 > $AVM_OUT/listed.json",
            f"printf '{req}' /v1/admin | {ssl} 2>/dev/null | tail -n 1 > $AVM_OUT/denied.json",
            f"/usr/bin/openssl s_client -connect other.example.test:{port} </dev/null"
            ' > $AVM_OUT/unlisted.txt 2>&1; echo "rc=$?" >> $AVM_OUT/unlisted.txt',
            f'nc -w 3 {UPSTREAM} {port} </dev/null > /dev/null 2>&1; echo "direct=$?" > $AVM_OUT/direct.txt',
            "env > $AVM_OUT/env.txt",
        ]
    )


def test_allowlisted_job_reaches_a_listed_name_with_the_credential_injected(
    jobenv: JobEnv, world: tuple[str, int, EgressCA, Path], tmp_path: Path
) -> None:
    world_ns, port, up_ca, upstream_log = world
    secret_store.put(jobenv.home, REF, KEY)
    names = [{"host": "api.example.test", "port": port, "methods": ["GET"], "paths": ["/v1/models"],
              "credential": {"header": "x-api-key", "ref": REF}}]  # fmt: skip
    outputs = ["listed.json", "denied.json", "unlisted.txt", "direct.txt", "env.txt"]
    spec_path = jobenv.spec(
        "gw", id="gw-names", image=tls_image(jobenv), command=["sh", "-c", script(port)],
        timeout=120, egress={"names": names}, outputs=outputs,
    )  # fmt: skip
    spec, result = run_through_gateway(
        jobenv, spec_path, tmp_path, world_ns, {f"api.example.test:{port}": (UPSTREAM, port)}, up_ca.cert_path
    )
    out = tmp_path / "out"
    assert result.status == "ok", (result.stdout, result.stderr)
    listed = json.loads((out / "listed.json").read_text())
    assert listed["path"] == "/v1/models"
    digest = "sha256:" + hashlib.sha256(KEY).hexdigest()  # the upstream answers the key's digest only
    assert [h for h in listed["headers"] if h[0] == "x-api-key"] == [["x-api-key", digest]]
    denied = json.loads((out / "denied.json").read_text())
    assert (denied["denied"], denied["reason"]) == (True, "path-not-allowed")
    unlisted = (out / "unlisted.txt").read_text()
    assert "Name or service not known" in unlisted and unlisted.rstrip().endswith("rc=1"), unlisted
    assert (out / "direct.txt").read_text() == "direct=1\n"
    env_text = (out / "env.txt").read_text()
    assert KEY.decode() not in env_text
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in env_text.splitlines()
    # the upstream saw exactly the one allowed request, with the key itself
    seen = [json.loads(line) for line in upstream_log.read_text().splitlines()]
    assert [r["path"] for r in seen] == ["/v1/models"]
    assert [h for h in seen[0]["headers"] if h[0] == "x-api-key"] == [["x-api-key", KEY.decode()]]
    # leak sweep: the key is nowhere on the guest's side of the boundary
    swept = [
        result.stdout,
        result.stderr,
        *(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()),
    ]
    if result.console_log is not None and result.console_log.exists():
        swept.append(result.console_log.read_text(errors="replace"))
    assert [text for text in swept if KEY.decode() in text] == []
    predicate = _receipt(jobenv, result.receipt_id)
    verified = run_avm(jobenv.home, "receipts", "verify")  # the gateway's events are in the signed chain
    assert verified.returncode == 0, (verified.stdout, verified.stderr)
    gw = predicate["observations"]["egress_gateway"]
    from controlplane.boundary import envoy

    assert gw["envoy_sha256"] == envoy.binary().sha256
    assert gw["policy_generation"] == spec.egress.policy.generation
    events = [e for e in predicate["events"] if e["type"] in ("egress.allowed", "egress.denied")]
    assert [(e["type"], e.get("reason"), e.get("count")) for e in events] == [
        ("egress.allowed", None, 1),
        ("egress.denied", "path-not-allowed", None),
    ]
    assert KEY.decode() not in json.dumps(predicate)
    checks = {c["name"]: c["ok"] for c in predicate["checks"]}
    assert all(checks.values()), predicate["checks"]
    assert home_pids(jobenv.home) == []
    # the job's listener went with the job, and with the last listener the gateway itself
    assert json.loads((tmp_path / "gw" / "state.json").read_text()) == {"listeners": {}, "pid": None}
    assert list((tmp_path / "gw" / "secrets").iterdir()) == []  # the credential left with the job
    bootstrap = str(tmp_path / "gw" / "xds" / "bootstrap.json")
    assert [p for p in Path("/proc").glob("[0-9]*") if bootstrap in _cmdline(p)] == []


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _receipt(env: JobEnv, receipt_id: str | None) -> dict[str, Any]:
    out = run_avm(env.home, "--json", "receipts", "show", str(receipt_id))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    return dict(doc.get("statement", doc)["predicate"])


def test_a_jobs_run_wide_budget_is_enforced_at_the_gateway_and_its_usage_is_in_the_receipt(
    jobenv: JobEnv, world: tuple[str, int, EgressCA, Path], tmp_path: Path
) -> None:
    world_ns, port, up_ca, upstream_log = world
    ssl = (
        '/usr/bin/openssl s_client -quiet -verify_return_error -CAfile "$SSL_CERT_FILE" '
        f"-servername api.example.test -connect api.example.test:{port}"
    )
    req = "GET /v1/chat/completions HTTP/1.1\\r\\nHost: api.example.test\\r\\nConnection: close\\r\\n\\r\\n"
    lines = [f"printf '{req}' | {ssl} 2>/dev/null | tail -n 1 > $AVM_OUT/r{i}.json" for i in range(3)]
    names = [{"host": "api.example.test", "port": port, "methods": ["GET"], "paths": ["/v1/*"]}]
    outputs = ["r0.json", "r1.json", "r2.json"]
    spec_path = jobenv.spec(
        "budget", id="gw-budget", image=tls_image(jobenv), command=["sh", "-c", "\n".join(lines)],
        timeout=120, egress={"names": names, "budget": {"requests": 2}}, outputs=outputs,
    )  # fmt: skip
    spec, result = run_through_gateway(
        jobenv, spec_path, tmp_path, world_ns, {f"api.example.test:{port}": (UPSTREAM, port)}, up_ca.cert_path
    )
    out = tmp_path / "out"
    assert result.status == "ok", (result.stdout, result.stderr)
    answers = [json.loads((out / name).read_text()) for name in outputs]
    assert [a.get("path") for a in answers[:2]] == ["/v1/chat/completions"] * 2
    assert answers[2] == {
        "budget": "requests",
        "denied": True,
        "destination": "api.example.test",
        "policy": spec.egress.policy.generation,
        "reason": "budget-exhausted",
    }
    assert len(upstream_log.read_text().splitlines()) == 2  # the third never left the gateway
    predicate = _receipt(jobenv, result.receipt_id)
    [row] = predicate["result"]["usage"]["rows"]
    assert {k: row[k] for k in ("identity", "destination", "requests", "allowed", "denied", "denied_by")} == {
        "identity": "job:gw-budget",
        "destination": "api.example.test",
        "requests": 3,
        "allowed": 2,
        "denied": 1,
        "denied_by": {"budget-exhausted": 1},
    }
    assert (row["bytes_sent"], row["input_tokens"], row["output_tokens"]) == (0, 0, 2 * 7)
    denied = [e for e in predicate["events"] if e["type"] == "egress.denied"]
    assert [(e["reason"], e["budget"], e["code"]) for e in denied] == [("budget-exhausted", "requests", 429)]
    checks = {c["name"]: c["ok"] for c in predicate["checks"]}
    assert all(checks.values()), predicate["checks"]


def test_a_jobs_inspected_name_refuses_a_body_over_its_ceiling_and_the_receipt_says_why(
    jobenv: JobEnv, world: tuple[str, int, EgressCA, Path], tmp_path: Path
) -> None:
    """Tier-2 jobs are inspected too: the host gateway's classifier judges the body of a POST to
    an ``inspect: true, max_sensitivity: internal`` name; a card number is a 403, a clean body
    reaches the upstream, and the receipt records the finding kinds, never the matched text."""
    world_ns, port, up_ca, upstream_log = world
    ssl = (
        '/usr/bin/openssl s_client -quiet -verify_return_error -CAfile "$SSL_CERT_FILE" '
        f"-servername api.example.test -connect api.example.test:{port}"
    )

    def post(body: str, out: str) -> str:
        head = f"POST /v1/messages HTTP/1.1\\r\\nHost: api.example.test\\r\\nContent-Length: {len(body)}"
        req = f"{head}\\r\\nContent-Type: application/json\\r\\nConnection: close\\r\\n\\r\\n{body}"
        return f"printf '{req}' | {ssl} 2>/dev/null | tail -n 1 > $AVM_OUT/{out}"

    # the guest assembles the number, so the spec (and the receipt's copy of its command) lacks it
    number = "4111 1111 1111 1111"
    hole = "X" * len(number)  # the body's length is the number's; the shell puts $CARD there
    card = post('{"note": "card ' + hole + '"}', "card.json").replace(hole, "'\"$CARD\"'")
    lines = ['N=1111; CARD="4111 $N $N $N"', card, post('{"note": "hello"}', "clean.json")]
    names = [{"host": "api.example.test", "port": port, "methods": ["POST"], "paths": ["/v1/messages"],
              "inspect": True, "max_sensitivity": "internal"}]  # fmt: skip
    spec_path = jobenv.spec(
        "inspect", id="gw-inspect", image=tls_image(jobenv), command=["sh", "-c", "\n".join(lines)],
        timeout=120, egress={"names": names}, outputs=["card.json", "clean.json"],
    )  # fmt: skip
    spec, result = run_through_gateway(
        jobenv, spec_path, tmp_path, world_ns, {f"api.example.test:{port}": (UPSTREAM, port)}, up_ca.cert_path
    )
    out = tmp_path / "out"
    assert result.status == "ok", (result.stdout, result.stderr)
    assert json.loads((out / "card.json").read_text()) == {
        "denied": True,
        "reason": "sensitivity-exceeds-ceiling",
        "destination": f"api.example.test:{port}",  # the rule's key (a port other than 443)
        "policy": spec.egress.policy.generation,
        "max_sensitivity": "internal",
    }
    assert json.loads((out / "clean.json").read_text())["path"] == "/v1/messages"
    assert [json.loads(line)["path"] for line in upstream_log.read_text().splitlines()] == ["/v1/messages"]
    predicate = _receipt(jobenv, result.receipt_id)
    [denied] = [e for e in predicate["events"] if e["type"] == "classifier.denied"]
    assert (denied["reason"], denied["findings"], denied["sensitivity"], denied["code"]) == (
        "sensitivity-exceeds-ceiling",
        ["card"],
        "restricted",
        403,
    )
    assert [e["count"] for e in predicate["events"] if e["type"] == "egress.allowed"] == [1]
    assert number not in json.dumps(predicate)  # kinds only, never the matched text
    assert number not in (tmp_path / "gw" / "access.log").read_text()
    checks = {c["name"]: c["ok"] for c in predicate["checks"]}
    assert all(checks.values()), predicate["checks"]
    # the classifier went with the job's listener (the last one): no process, no socket
    assert list((tmp_path / "gw" / "classifier").iterdir()) == []
    assert [p for p in Path("/proc").glob("[0-9]*") if "controlplane.boundary.classifyd" in _cmdline(p)
            and str(tmp_path / "gw") in _cmdline(p)] == []  # fmt: skip
