"""Every user of a transport closes it on every path, counted at a real sshd (tests/plugins/sshd.py).

sshd logs ``Closing connection to`` only when the client has ended the session; a connection left
open by a refused command would still be alive at that server when the command has returned.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from controlplane.cli import main
from controlplane.evidence import keys
from controlplane.home import Home
from controlplane.transport import LocalTransport, Transport, connect, inventory
from tests.plugins.sshd import Sshd

ACCEPTED = re.compile(r"Accepted publickey for \S+ from 127\.0\.0\.1 port (\d+)")
# how sshd ends a client's connection: a clean close after a session, a close or a reset before one
ENDED = re.compile(
    r"(?:Closing connection to|Connection closed by|Read error from remote host) 127\.0\.0\.1 port (\d+)"
)


def _ports(sshd: Sshd, pattern: re.Pattern[str]) -> set[str]:
    return {m.group(1) for m in pattern.finditer(sshd.log.read_text(errors="replace"))}


def _still_open(sshd: Sshd, accepted_before: set[str]) -> set[str]:
    """Client ports of sessions accepted since ``accepted_before`` that the server has not seen end.
    The server logs the end shortly after the client closes: poll for it (bounded)."""
    new = _ports(sshd, ACCEPTED) - accepted_before
    assert new, "no connection was made"
    deadline = time.monotonic() + 10.0
    while (open_ := new - _ports(sshd, ENDED)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return open_


def test_both_transports_are_context_managers(sshd: Sshd) -> None:
    before = _ports(sshd, ACCEPTED)
    with connect(sshd.target()) as host:
        assert isinstance(host, Transport)
        assert host.run(["true"]).rc == 0
    assert _still_open(sshd, before) == set()
    with LocalTransport() as local:
        assert isinstance(local, Transport)
        assert local.run(["true"]).rc == 0


def test_job_run_refused_after_connecting_closes_the_connection(
    sshd: Sshd, home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`avm job run --target` connects first; a refusal (the pinned image is not in the store)
    must still end the session at the server, and nothing is created in the home."""
    keys.init(home)
    inventory.save(home, sshd.target(name="remote1"))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"id: closes\nimage: avm/not-here@sha256:{'0' * 64}\ncommand: [/bin/true]\n")
    before = sorted(p.relative_to(home.root) for p in home.root.rglob("*") if "receipts" not in p.parts)
    accepted = _ports(sshd, ACCEPTED)
    with pytest.raises(SystemExit) as exit_info:
        main(["job", "run", "--target", "remote1", str(spec)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3, err
    assert len(_ports(sshd, ACCEPTED) - accepted) == 1  # it did connect before the refusal
    assert _still_open(sshd, accepted) == set(), "the refused command left its SSH connection open"
    after = sorted(p.relative_to(home.root) for p in home.root.rglob("*") if "receipts" not in p.parts)
    assert after == before
