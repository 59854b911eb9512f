"""The permission-request recorder (hostscripts/request_recorder.py) run for real: socket-activated
the way systemd does it (fd 3, LISTEN_FDS, LISTEN_PID), on a unix socket in the test's own
directory, spoken to over HTTP. What it stores, what it refuses, and its listing as root."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import hostscripts

SCRIPT = Path(hostscripts.__file__).resolve().parent / "request_recorder.py"
BODY = json.dumps({"destination": "api.example.test", "methods": ["GET"], "paths": ["/v2/*"], "reason": "r"})


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[dict[str, Path]]:
    store = tmp_path / "store"
    store.mkdir(mode=0o750)
    path = tmp_path / "requests.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    fd = listener.fileno()
    proc = subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec {sys.executable} -I "$0" serve "$1"', SCRIPT, store],
        preexec_fn=lambda: os.dup2(fd, 3),
        close_fds=False,
    )
    try:
        yield {"socket": path, "store": store}
    finally:
        proc.kill()
        proc.wait()
        listener.close()


def call(sock: Path, raw: bytes) -> tuple[int, dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(raw)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, json.loads(resp.read())


def post(
    sock: Path, body: str, identity: str | None = "profile:gw", path: str = "/requests"
) -> tuple[int, Any]:
    data = body.encode()
    head = f"POST {path} HTTP/1.1\r\nhost: avm.boundary\r\ncontent-length: {len(data)}\r\n"
    head += f"x-avm-identity: {identity}\r\n" if identity is not None else ""
    return call(sock, head.encode() + b"connection: close\r\n\r\n" + data)


def test_a_request_is_stored_as_it_came_with_the_gateways_identity(recorder: dict[str, Path]) -> None:
    status, doc = post(recorder["socket"], BODY)
    assert status == 202, doc
    rid = doc["request"]
    assert (doc["status"], len(rid), rid[:3]) == ("pending", 19, "rq-")
    stored = recorder["store"] / f"{rid}.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o640
    record = json.loads(stored.read_text())
    assert sorted(record) == ["body", "id", "identity", "received"]
    assert (record["id"], record["identity"], record["body"]) == (rid, "profile:gw", BODY)
    assert [p.name for p in recorder["store"].iterdir()] == [f"{rid}.json"]  # no temporary left


@pytest.mark.parametrize(
    ("identity", "path", "size", "status"),
    [
        (None, "/requests", 10, 400),  # not forwarded by the gateway: no identity
        ("job:j-1", "/requests", 10, 400),  # only a profile's listener forwards requests
        ("profile:../../x", "/requests", 10, 400),
        ("profile:gw", "/policy", 10, 400),
        ("profile:gw", "/requests", 8193, 413),
    ],
)
def test_what_the_recorder_refuses_is_not_stored(
    recorder: dict[str, Path], identity: str | None, path: str, size: int, status: int
) -> None:
    got, doc = post(recorder["socket"], "x" * size, identity, path)
    assert got == status, doc
    assert list(recorder["store"].iterdir()) == []


def test_a_body_without_a_length_is_refused(recorder: dict[str, Path]) -> None:
    raw = b"POST /requests HTTP/1.1\r\nhost: avm.boundary\r\nx-avm-identity: profile:gw\r\n"
    raw += b"connection: close\r\n\r\n"
    assert call(recorder["socket"], raw)[0] == 411
    assert list(recorder["store"].iterdir()) == []


def test_the_store_is_bounded(recorder: dict[str, Path]) -> None:
    for i in range(256):
        (recorder["store"] / f"rq-{i:016x}.json").write_text("{}")
    status, doc = post(recorder["socket"], BODY)
    assert (status, doc) == (429, {"error": "too many requests are waiting for a decision"})
    assert len(list(recorder["store"].iterdir())) == 256


def test_the_listing_reads_regular_files_only_and_never_follows_a_link(
    recorder: dict[str, Path], tmp_path: Path
) -> None:
    _, doc = post(recorder["socket"], BODY)
    secret = tmp_path / "elsewhere"
    secret.write_text("not for the listing")
    (recorder["store"] / "rq-aaaaaaaaaaaaaaaa.json").symlink_to(secret)
    (recorder["store"] / "rq-bbbbbbbbbbbbbbbb.json").mkdir()
    (recorder["store"] / "notes.txt").write_text("ignored")
    out = subprocess.run(
        [sys.executable, "-I", SCRIPT, "list", recorder["store"]], capture_output=True, text=True, check=True
    )
    records = json.loads(out.stdout)["records"]
    assert [r["file"] for r in records] == [f"{doc['request']}.json"]
    assert json.loads(records[0]["text"])["body"] == BODY


def test_without_systemds_socket_it_refuses_to_start(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-I", SCRIPT, "serve", tmp_path], capture_output=True, text=True)
    assert run.returncode == 1
    assert (
        run.stderr.strip() == "avm-requests: expected exactly one socket from systemd (avm-requests.socket)"
    )
