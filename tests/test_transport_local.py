"""The local transport: real subprocesses and files on this machine."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import pytest

from controlplane.errors import CommandFailed, CommandTimeout, OperationalError
from controlplane.transport import LocalTransport, Transport


@pytest.fixture
def local() -> LocalTransport:
    return LocalTransport()


def test_is_a_transport(local: LocalTransport) -> None:
    assert isinstance(local, Transport)


def test_run_returns_rc_stdout_stderr(local: LocalTransport) -> None:
    result = local.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandFailed) as info:
        result.check()
    assert (info.value.rc, info.value.stderr) == (3, "err\n")


def test_stdin(local: LocalTransport) -> None:
    assert local.run(["cat"], stdin=b"hello").stdout == "hello"


def test_argv_is_passed_literally(local: LocalTransport) -> None:
    marker = Path(f"/tmp/pwned-{secrets.token_hex(6)}")
    cases = [f"x; touch {marker}", "$(id)", "`id`", "a'b\"c", "*"]
    result = local.run(["printf", "%s\\0", *cases])
    assert result.stdout.split("\0")[:-1] == cases
    assert not marker.exists()


def test_timeout_kills_command(local: LocalTransport) -> None:
    marker = f"30.{secrets.randbelow(10**6):06d}"
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        local.run(["sleep", marker], timeout=0.5)
    assert time.monotonic() - start < 2.5
    assert info.value.code == "command-timeout"
    alive = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, check=False)
    assert alive.returncode == 1, alive.stdout


def test_missing_tool(local: LocalTransport) -> None:
    with pytest.raises(OperationalError) as info:
        local.run(["avm-no-such-tool-xyz"])
    assert info.value.code == "tool-missing"


def test_secrets_are_masked(local: LocalTransport) -> None:
    result = local.run(["echo", "token=s3cr3t-value"], secrets=["s3cr3t-value"])
    assert (result.stdout, result.argv) == ("token=***\n", ["echo", "token=***"])


def test_put_get_round_trip_with_mode(local: LocalTransport, tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "file"
    local.put(b"data", str(path), mode=0o600)
    assert local.get(str(path)) == b"data"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["file"]  # no temp file left


def test_get_missing_file(local: LocalTransport, tmp_path: Path) -> None:
    with pytest.raises(OperationalError) as info:
        local.get(str(tmp_path / "absent"))
    assert info.value.code == "remote-file-missing"
