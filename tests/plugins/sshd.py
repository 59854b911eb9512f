"""A real OpenSSH server on 127.0.0.1 with keys made at test time, for the SSH transport tests.

One sshd per test session (starting one costs ~100 ms, but a session fixture keeps the suite
fast); tests that count connections read the growth of its log, not its total.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from controlplane.transport.inventory import Target
from tests.plugins.require import require_tools

SSHD = "/usr/sbin/sshd"


def new_ed25519(path: Path) -> str:
    """Write a fresh unencrypted OpenSSH ed25519 private key to ``path``; return its public line."""
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    return _public_line(key.public_key())


def new_public_line(kind: str = "ed25519") -> str:
    """A public key line of a key nobody holds, for pinning the wrong key."""
    if kind == "ecdsa":
        return _public_line(ec.generate_private_key(ec.SECP256R1()).public_key())
    return _public_line(ed25519.Ed25519PrivateKey.generate().public_key())


def _public_line(key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass
class Sshd:
    host: str
    port: int
    user: str
    host_key_line: str
    client_key: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"

    def target(
        self,
        name: str = "sshd-test",
        *,
        host_key: str | None = None,
        pinned: bool = True,
        identity: Path | None = None,
    ) -> Target:
        """The inventory entry for this server, pinned to its real key unless ``host_key`` names
        another one or ``pinned=False``."""
        return Target(
            name=name,
            url=self.url,
            host_key=(host_key or self.host_key_line) if pinned else None,
            identity=str(identity or self.client_key),
        )

    def log_count(self, needle: str) -> int:
        """How many sshd log lines contain ``needle`` (sshd -e logs every connection)."""
        return sum(needle in line for line in self.log.read_text(errors="replace").splitlines())


def _config(d: Path, port: int, host_key: Path, authorized: Path) -> str:
    return "\n".join(
        [
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            "PidFile none",
            f"AuthorizedKeysFile {authorized}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "LogLevel VERBOSE",
            "MaxSessions 64",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A running ``sshd -D -e`` on 127.0.0.1 at a free port, key-only, logged to a file."""
    require_tools(SSHD)
    from controlplane.transport.ssh import wait_for_ssh

    d = tmp_path_factory.mktemp("sshd")
    host_key = d / "ssh_host_ed25519_key"
    host_key_line = new_ed25519(host_key)
    client_key = d / "client_ed25519"
    (d / "authorized_keys").write_text(new_ed25519(client_key) + "\n")
    port = free_port()
    config = d / "sshd_config"
    config.write_text(_config(d, port, host_key, d / "authorized_keys"))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    log = d / "sshd.log"
    with log.open("wb") as log_fh:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log_fh, stderr=log_fh)
    server = Sshd("127.0.0.1", port, getpass.getuser(), host_key_line, client_key, log, proc)
    try:
        try:
            wait_for_ssh(server.host, port, 10.0)
        except Exception:
            pytest.fail(f"sshd did not start (rc={proc.poll()}):\n{log.read_text(errors='replace')}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        # sshd's session children exit with their connections; wait briefly for the port to free.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _listening(port):
            time.sleep(0.05)
        shutil.rmtree(d, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
