"""The reference classifier: the detector over a table of positives and negatives
(tests/cases/classifier.yaml), and its ext_authz HTTP service for real (a process, TCP and a unix
socket, the host's bare python3 on the installed file set)."""

from __future__ import annotations

import http.client
import json
import secrets
import shutil
import socket
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.boundary import classifyd
from controlplane.boundary.classify import CLASSIFIER, LEVELS, SENSITIVITY, classify, luhn
from tests.plugins import cases

PORT = 19301


def tokens() -> dict[str, str]:
    alnum = string.ascii_letters + string.digits
    while True:  # a random token mixing all three classes (what the entropy rule is for)
        rnd = "".join(secrets.choice(alnum) for _ in range(32))
        if any(c.isupper() for c in rnd) and any(c.islower() for c in rnd) and any(c.isdigit() for c in rnd):
            break
    return {
        "GHTOKEN": "ghp_" + "".join(secrets.choice(alnum) for _ in range(36)),
        "AWSKEY": "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
        "HEXKEY": secrets.token_hex(32),
        "RANDOMKEY": rnd,
    }


@pytest.mark.parametrize("case", cases.load("classifier", keys={"body", "sensitivity", "findings"}))
def test_classifier_case(case: dict[str, Any]) -> None:
    body = cases.expand(case["body"], tokens()).encode()
    verdict = classify(body)
    assert verdict.to_dict() == {
        "sensitivity": case["sensitivity"],
        "findings": [{"kind": k, "offset": o} for k, o in case["findings"]],
        "classifier": CLASSIFIER,
    }


def test_verdict_never_holds_the_matched_text() -> None:
    t = tokens()
    body = f"alice@example.com 4111 1111 1111 1111 123-45-6789 {t['GHTOKEN']} {t['RANDOMKEY']}"
    text = json.dumps(classify(body.encode()).to_dict())
    for part in ("alice", "4111", "6789", t["GHTOKEN"], t["RANDOMKEY"]):
        assert part not in text


def test_every_kind_has_a_level_and_luhn_is_exact() -> None:
    assert set(SENSITIVITY.values()) <= set(LEVELS) and LEVELS[0] == "public"
    assert luhn("79927398713") is True
    assert [d for d in range(10) if luhn(f"7992739871{d}")] == [3]


def test_findings_are_capped_but_the_level_is_not() -> None:
    body = " ".join(f"u{i}@example.com" for i in range(100)) + " 4111111111111111"
    verdict = classify(body.encode())
    assert len(verdict.findings) == 64
    assert verdict.sensitivity == "restricted"


class Service:
    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=cwd)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == b"ready"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def tcp_service() -> Iterator[Service]:
    svc = Service([sys.executable, "-m", "controlplane.boundary.classifyd", "--listen", f"127.0.0.1:{PORT}"])
    yield svc
    svc.stop()


def ask(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str] | None = None) -> Any:
    conn.request("POST", "/verdict/v1/messages", body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_service_answers_the_verdict_as_json_and_headers(tcp_service: Service) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
    status, headers, body = ask(conn, b"card 4111111111111111 mail bob@example.org")
    assert status == 200
    assert json.loads(body) == {
        "sensitivity": "restricted",
        "findings": [{"kind": "card", "offset": 5}, {"kind": "email", "offset": 27}],
        "classifier": CLASSIFIER,
    }
    assert (headers["x-avm-sensitivity"], headers["x-avm-findings"], headers["x-avm-classifier"]) == (
        "restricted",
        "card,email",
        CLASSIFIER,
    )
    # same connection (keep-alive), a clean body
    status, headers, _ = ask(conn, b"hello")
    assert (status, headers["x-avm-sensitivity"], headers["x-avm-findings"]) == (200, "public", "-")


def test_service_ignores_every_header_of_the_request(tcp_service: Service) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
    steer = {
        "x-avm-sensitivity": "public",
        "x-sensitivity": "public",
        "x-classification": "public",
        "content-type": "application/x-public",
    }
    status, headers, _ = ask(conn, b"ssn 123-45-6789", steer)
    assert (status, headers["x-avm-sensitivity"], headers["x-avm-findings"]) == (
        200,
        "confidential",
        "us-ssn",
    )


def test_service_refuses_what_it_cannot_read(tcp_service: Service) -> None:
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as sock:
        sock.sendall(
            b"POST /verdict HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        assert sock.recv(4096).split(b"\r\n", 1)[0] == b"HTTP/1.1 400 Bad Request"


def test_installed_file_set_runs_on_a_bare_python3_over_a_unix_socket(tmp_path: Path) -> None:
    python3 = shutil.which("python3", path="/usr/bin")
    assert python3 is not None, "the host's python3 (Debian) is a prerequisite"
    tree = tmp_path / "lib"
    for rel, data in classifyd.sources().items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    sock = tmp_path / "run" / "classifier.sock"
    sock.parent.mkdir()
    # -s -E: no user site, no environment: only the stdlib and the copied tree (the cwd)
    svc = Service(
        [python3, "-s", "-E", "-m", "controlplane.boundary.classifyd", "--listen", f"unix:{sock}"], tree
    )
    try:
        assert oct(sock.stat().st_mode & 0o777) == oct(0o660)

        class Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(sock))

        status, headers, _ = ask(Conn("localhost", timeout=5), b"DNI 12345678Z")
        assert (status, headers["x-avm-sensitivity"], headers["x-avm-findings"]) == (
            200,
            "confidential",
            "es-dni",
        )
    finally:
        svc.stop()
