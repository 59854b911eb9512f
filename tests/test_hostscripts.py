"""The host-side programs of controlplane/hostscripts/, run the way the host runs them.

Each is ``python3 -c <file text> ARGS`` on the host (the gatherer and the sandbox probe have
their own tests); here the release unpacker, the ``current`` flip, the health poll and the
namespace connectivity probe run with this machine's ``/usr/bin/python3`` (Debian 12's, as on
the golden image) against files, a listener and an HTTP server the test made itself.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import hostscripts
from controlplane.hostscripts import flip_link, unpack_release
from controlplane.jobs.egress import probe as netprobe
from controlplane.promote import hostops

PY = "/usr/bin/python3"


def _run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-I", "-S", "-c", hostscripts.text(name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_modules_send_the_package_files() -> None:
    assert hostscripts.text("unpack_release") == hostops._UNPACK
    assert hostscripts.text("flip_link") == hostops._FLIP
    assert hostscripts.text("health_probe") == hostops._HEALTH
    assert hostscripts.text("net_probe") == netprobe._PROBE


def _tar(members: dict[str, bytes | str], *, exec_: frozenset[str] = frozenset()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o755 if name in exec_ else 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _signed(members: dict[str, bytes | str]) -> str:
    return json.dumps(
        {
            k: "symlink:" + v if isinstance(v, str) else "sha256:" + hashlib.sha256(v).hexdigest()
            for k, v in members.items()
        }
    )


MEMBERS: dict[str, bytes | str] = {"bin/run": b"#!/bin/sh\necho hi\n", "README": b"r\n", "latest": "bin/run"}


def test_unpack_verifies_and_installs_a_release_read_only(tmp_path: Path) -> None:
    tar = tmp_path / "rel.tar"
    tar.write_bytes(_tar(MEMBERS, exec_=frozenset({"bin/run"})))
    final = tmp_path / "releases" / "abc"
    final.parent.mkdir()
    done = _run("unpack_release", str(tar), str(final), _signed(MEMBERS))
    assert (done.returncode, done.stderr) == (0, "")
    assert unpack_release.listing(str(final)) == json.loads(_signed(MEMBERS))
    assert (os.stat(final / "bin" / "run").st_mode & 0o777, os.stat(final / "README").st_mode & 0o777) == (
        0o555,
        0o444,
    )
    assert os.stat(final).st_mode & 0o777 == 0o555
    assert not tar.exists() and not (tmp_path / "releases" / "abc.partial").exists()
    again = _run("unpack_release", str(tmp_path / "none.tar"), str(final), _signed(MEMBERS))
    assert (again.returncode, again.stderr) == (1, f"release exists: {final}\n")


def test_unpack_refuses_content_that_differs_from_the_signed_list(tmp_path: Path) -> None:
    tar = tmp_path / "rel.tar"
    tar.write_bytes(_tar({**MEMBERS, "README": b"tampered\n"}))
    final = tmp_path / "abc"
    done = _run("unpack_release", str(tar), str(final), _signed(MEMBERS))
    assert (done.returncode, done.stderr) == (1, "content differs from the signed file list: README\n")
    assert sorted(os.listdir(tmp_path)) == ["rel.tar"]  # no release, no partial; the tar is kept


@pytest.mark.parametrize("name", ["../escape", "/abs"])
def test_unpack_refuses_an_unsafe_member(tmp_path: Path, name: str) -> None:
    tar = tmp_path / "rel.tar"
    tar.write_bytes(_tar({name: b"x"}))
    done = _run("unpack_release", str(tar), str(tmp_path / "abc"), "{}")
    assert (done.returncode, done.stderr) == (1, f"unsafe member: {name}\n")
    assert not (tmp_path / "abc").exists() and not (tmp_path.parent / "escape").exists()


def test_flip_replaces_the_link_in_one_rename(tmp_path: Path) -> None:
    link = tmp_path / "web" / "current"
    done = _run("flip_link", "/opt/agent/releases/a", str(link))
    assert (done.returncode, os.readlink(link)) == (0, "/opt/agent/releases/a")
    (tmp_path / "web" / "current.new").symlink_to("stale")  # a leftover of an interrupted flip
    flip_link.flip("/opt/agent/releases/b", str(link))
    assert os.readlink(link) == "/opt/agent/releases/b"
    assert sorted(os.listdir(tmp_path / "web")) == ["current"]


@pytest.fixture
def health_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"commit": "c0ffee", "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_health_reports_the_body_once_the_commit_answers(health_server: int) -> None:
    done = _run("health_probe", str(health_server), "/healthz", "c0ffee", "10")
    assert (done.returncode, json.loads(done.stdout)) == (0, {"commit": "c0ffee", "path": "/healthz"})


def test_health_fails_with_the_last_answer_when_the_commit_differs(health_server: int) -> None:
    done = _run("health_probe", str(health_server), "/healthz", "deadbeef", "0.5")
    assert (done.returncode, json.loads(done.stdout)) == (1, {"error": "reports commit c0ffee"})


def test_net_probe_reaches_a_listener_and_reports_a_closed_port() -> None:
    """A tcp target is reached when it connects and answers (the probe reads the first bytes)."""
    with socket.socket() as listener, socket.socket() as closed:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connect is refused

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"avm-echo")

        server = threading.Thread(target=answer, daemon=True)
        server.start()
        open_port, closed_port = listener.getsockname()[1], closed.getsockname()[1]
        targets = [["127.0.0.1", open_port, "tcp"], ["127.0.0.1", closed_port, "tcp"]]
        done = _run("net_probe", json.dumps(targets), "2.0")
        server.join(10)
    assert done.returncode == 0, done.stderr
    rows = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in json.loads(done.stdout)]
    assert rows == [
        {
            "host": "127.0.0.1",
            "port": open_port,
            "proto": "tcp",
            "reached": True,
            "answer": "avm-echo",
            "error": "",
        },
        {
            "host": "127.0.0.1",
            "port": closed_port,
            "proto": "tcp",
            "reached": False,
            "answer": "",
            "error": "ConnectionRefusedError: [Errno 111] Connection refused",
        },
    ]
