"""The SSH transport against a real OpenSSH server on 127.0.0.1 (tests/plugins/sshd.py)."""

from __future__ import annotations

import hashlib
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.errors import CommandTimeout, OperationalError, RefusedError
from controlplane.transport import Transport, connect
from controlplane.transport.ssh import SshTransport, fingerprint, parse_host_key, wait_for_ssh
from tests.plugins.sshd import Sshd, free_port, new_ed25519, new_public_line


@pytest.fixture
def ssh(sshd: Sshd) -> Iterator[SshTransport]:
    with SshTransport.from_target(sshd.target()) as transport:
        yield transport


def test_connect_picks_ssh_transport(sshd: Sshd) -> None:
    transport = connect(sshd.target())
    try:
        assert isinstance(transport, SshTransport)
        assert isinstance(transport, Transport)
    finally:
        transport.close()


def test_run_returns_rc_stdout_stderr(ssh: SshTransport) -> None:
    result = ssh.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok
    assert result.duration_s > 0


def test_stdin_is_delivered_whole(ssh: SshTransport) -> None:
    # Larger than any channel window, so sending and receiving must interleave.
    data = secrets.token_hex(1 << 20).encode()
    result = ssh.run(["sha256sum"], stdin=data)
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_argv_is_passed_literally_never_through_a_shell(ssh: SshTransport) -> None:
    marker = Path(f"/tmp/pwned-{secrets.token_hex(6)}")
    hostile = f"x; touch {marker}"
    cases = [hostile, "$(id)", "`id`", "a'b\"c", "*", "two  spaces", "line\nbreak", "-n"]
    result = ssh.run(["printf", "%s\\0", *cases])
    assert result.stdout.split("\0")[:-1] == cases
    assert not marker.exists()


def test_secrets_are_masked_in_result(ssh: SshTransport) -> None:
    result = ssh.run(["echo", "token=s3cr3t-value"], secrets=["s3cr3t-value"])
    assert result.stdout == "token=***\n"
    assert result.argv == ["echo", "token=***"]


def test_timeout_kills_remote_command(ssh: SshTransport) -> None:
    marker = f"30.{secrets.randbelow(10**6):06d}"
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        ssh.run(["sleep", marker], timeout=1)
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 3.0, elapsed
    assert info.value.code == "command-timeout"
    # sshd runs on this machine, so the remote process is visible here.
    alive = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, check=False)
    assert alive.returncode == 1, alive.stdout
    # The connection is still usable afterwards.
    assert ssh.run(["echo", "after"]).stdout == "after\n"


def test_exit_124_before_deadline_is_not_a_timeout(ssh: SshTransport) -> None:
    assert ssh.run(["sh", "-c", "exit 124"], timeout=30).rc == 124


def test_missing_tool_is_classified(ssh: SshTransport) -> None:
    with pytest.raises(OperationalError) as info:
        ssh.run(["avm-no-such-tool-xyz"])
    assert info.value.code == "tool-missing"


def test_one_connection_is_reused(sshd: Sshd) -> None:
    before = sshd.log_count("Accepted publickey")
    with SshTransport.from_target(sshd.target()) as transport:
        for i in range(5):
            assert transport.run(["echo", str(i)]).stdout == f"{i}\n"
        transport.put(b"x", f"/tmp/avm-reuse-{secrets.token_hex(4)}")
    assert sshd.log_count("Accepted publickey") - before == 1


def test_unpinned_host_is_refused_before_connecting(sshd: Sshd) -> None:
    before = sshd.log_count("Connection from")
    with pytest.raises(RefusedError) as info:
        SshTransport.from_target(sshd.target(pinned=False))
    assert info.value.code == "host-key-not-pinned"
    time.sleep(0.2)  # a connection, had one been made, would be logged by now
    assert sshd.log_count("Connection from") == before


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa"])
def test_changed_host_key_is_refused(sshd: Sshd, kind: str) -> None:
    wrong = new_public_line(kind)
    before = sshd.log_count("Accepted publickey")
    with pytest.raises(RefusedError) as info:
        SshTransport.from_target(sshd.target(host_key=wrong))
    err = info.value
    assert err.code == "host-key-mismatch"
    assert err.details["expected"] == fingerprint(parse_host_key(wrong))
    assert err.details["actual"] == fingerprint(parse_host_key(sshd.host_key_line))
    assert err.details["actual"].startswith("SHA256:")
    assert err.details["expected"] in err.message and err.details["actual"] in err.message
    assert sshd.log_count("Accepted publickey") == before  # refused before authenticating


def test_unknown_identity_fails_auth(sshd: Sshd, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    new_ed25519(stranger)
    with pytest.raises(OperationalError) as info:
        SshTransport.from_target(sshd.target(identity=stranger))
    assert info.value.code == "ssh-auth-failed"


def test_login_check_proves_a_login_with_one_session(sshd: Sshd) -> None:
    before = sshd.log_count("Accepted publickey")
    with SshTransport.from_target(sshd.target()) as transport:
        took = transport.login_check(timeout=10)
    assert 0 < took < 10
    assert sshd.log_count("Accepted publickey") - before == 1


def test_login_check_fails_when_the_shell_does_not_run(sshd: Sshd, tmp_path: Path) -> None:
    # a key whose sessions the server ends with status 3, whatever they ask to run
    forced = tmp_path / "forced"
    line = new_ed25519(forced)
    with (sshd.client_key.parent / "authorized_keys").open("a") as fh:
        fh.write(f'command="exit 3" {line}\n')
    with (
        SshTransport.from_target(sshd.target(identity=forced)) as transport,
        pytest.raises(OperationalError) as info,
    ):
        transport.login_check(timeout=10)
    assert info.value.code == "ssh-login-failed"
    assert info.value.details["rc"] == 3


def test_closed_port_is_unreachable(sshd: Sshd) -> None:
    target = sshd.target().model_copy(update={"url": f"ssh://root@127.0.0.1:{free_port()}"})
    with pytest.raises(OperationalError) as info:
        SshTransport.from_target(target, connect_timeout=2)
    assert info.value.code == "host-unreachable"


def test_put_get_round_trip_atomic_with_mode(ssh: SshTransport, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "file.bin"
    data = secrets.token_bytes(300_000)
    ssh.put(data, str(path), mode=0o600)
    assert ssh.get(str(path)) == data
    assert path.stat().st_mode & 0o777 == 0o600
    ssh.put(b"second", str(path), mode=0o640)
    assert path.read_bytes() == b"second"
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]  # no temp file left


def test_put_replaces_atomically_for_a_concurrent_reader(ssh: SshTransport, tmp_path: Path) -> None:
    path = tmp_path / "flip"
    old, new = b"a" * 2_000_000, b"b" * 2_000_000
    path.write_bytes(old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(path.read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        ssh.put(new, str(path))
    finally:
        stop.set()
        thread.join()
    assert seen <= {old, new}  # never a partial file
    assert path.read_bytes() == new


def test_get_missing_file(ssh: SshTransport, tmp_path: Path) -> None:
    with pytest.raises(OperationalError) as info:
        ssh.get(str(tmp_path / "absent"))
    assert info.value.code == "remote-file-missing"


def test_wait_for_ssh_reads_the_banner(sshd: Sshd) -> None:
    assert wait_for_ssh(sshd.host, sshd.port, 5).startswith("SSH-2.0-OpenSSH")


def test_wait_for_ssh_wants_a_banner_not_an_open_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(OperationalError) as info:
            wait_for_ssh("127.0.0.1", port, 0.5)
    assert info.value.code == "host-unreachable"
    assert time.monotonic() - start < 3
