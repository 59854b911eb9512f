"""The egress probe matrix from inside real guests: every deny class denied, the allowed destination reached.

Traffic stays in namespaces this test creates: a "world" namespace holds the servers (TEST-NET-2
addresses on its loopback) and the outer end of the job network's veth; the guest is a real QEMU
microVM on the job network's tap, filtered by the egress module's nftables table.
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

from controlplane.jobs.probe import probe_egress
from controlplane.jobs.spec import load_jobspec
from tests.plugins.jobimages import JobEnv, home_pids
from tests.plugins.vms import run_avm

ALLOWED = "198.51.100.10"
UNLISTED = "198.51.100.20"
SERVER = r"""
import socket, sys, threading
hits = open(sys.argv[1], "a", buffering=1)
def serve(addr, port, tag):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(16)
    while True:
        c, _ = s.accept(); hits.write(tag + "\n"); c.sendall(tag.encode() + b"\n"); c.close()
for addr, port, tag in [("198.51.100.10", 8080, "allowed"), ("198.51.100.10", 8081, "wrong-port"),
                        ("198.51.100.20", 80, "unlisted"), ("169.254.169.254", 80, "metadata")]:
    threading.Thread(target=serve, args=(addr, port, tag), daemon=True).start()
print("ready", flush=True)
threading.Event().wait(600)
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    name, hits = f"avmjw-{os.getpid()}", tmp_path / "hits"
    hits.write_text("")
    sh("ip", "netns", "add", name)
    server = None
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        for addr in (ALLOWED, UNLISTED, "169.254.169.254"):
            sh("ip", "-n", name, "addr", "add", f"{addr}/32", "dev", "lo")
        argv = ["ip", "netns", "exec", name, sys.executable, "-c", SERVER, str(hits)]
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield name, hits
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_probe_matrix_from_a_real_guest(jobenv: JobEnv, world: tuple[str, Path]) -> None:
    world_ns, hits = world
    spec_path = jobenv.spec(
        "probe",
        id="probe-allow",
        command=["true"],
        timeout=90,
        egress={"allow": [{"host": ALLOWED, "port": 8080}]},
    )
    report = probe_egress(
        jobenv.home,
        load_jobspec(spec_path),
        spec_dir=spec_path.parent,
        unlisted=[(UNLISTED, 80)],
        network_options={"uplink_netns": world_ns},
    )
    rows = {(r.klass, r.target): r for r in report.rows}
    assert rows[("allowed", f"{ALLOWED}:8080/tcp")].observed == "reached", report.as_dict()
    classes = {r.klass for r in report.rows}
    assert classes >= {"allowed", "unlisted-server", "host-side", "listed-host-wrong-port", "dns"}
    assert classes >= {"metadata", "icmp", "ipv6"}
    bad = [r for r in report.rows if not r.as_expected]
    assert not bad, bad
    assert report.ok
    # the servers agree: only the allowed one was ever reached
    assert set(hits.read_text().split()) == {"allowed"}
    predicate = _receipt(jobenv, report.receipt_id)
    counters = predicate["observations"]["egress_counters"]
    assert counters["allowed"]["packets"] >= 1
    assert sum(v["packets"] for k, v in counters.items() if k.startswith("denied")) >= 5
    # every denied destination is an audit event in the job's receipt
    denied = {e["destination"] for e in predicate["events"] if e["type"] == "egress.denied"}
    assert any(d.startswith(UNLISTED) for d in denied), predicate["events"]
    checks = {c["name"]: c["ok"] for c in predicate["checks"]}
    assert checks["egress-netns-gone"] and checks["egress-nft-table-gone"] and checks["qemu-process-gone"]
    assert all(checks.values()), predicate["checks"]
    assert home_pids(jobenv.home) == []


def test_deny_all_job_has_no_nic_and_every_class_is_denied(jobenv: JobEnv) -> None:
    spec = jobenv.spec("probe-none", id="probe-none", command=["true"])
    out = run_avm(jobenv.home, "--json", "job", "probe-egress", str(spec))
    assert out.returncode == 0, (out.stdout, out.stderr)
    doc = json.loads(out.stdout)
    assert doc["ok"] and all(r["observed"] == "denied" for r in doc["rows"])
    assert any("unreachable" in r["detail"].lower() for r in doc["rows"]), doc["rows"]


def _receipt(env: JobEnv, receipt_id: str | None) -> dict[str, Any]:
    out = run_avm(env.home, "--json", "receipts", "show", str(receipt_id))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    statement = doc.get("statement", doc)
    return dict(statement["predicate"])
