"""What an SSH target is made of: its URL, the host key avm pins (and its OpenSSH fingerprint),
and the identity avm logs in with.

paramiko is imported inside the functions that need it, so ``avm --help`` stays fast.
"""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from controlplane.errors import OperationalError, UsageError

if TYPE_CHECKING:
    import paramiko


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key, as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def parse_host_key(line: str) -> paramiko.PKey:
    """The public key in an OpenSSH line (``ssh-ed25519 AAAA... [comment]``; a leading
    known_hosts host field is tolerated). Raises ``UsageError('host-key-invalid')``."""
    import paramiko
    from paramiko.pkey import UnknownKeyType

    fields = line.split()
    if len(fields) >= 3 and not _looks_like_key_type(fields[0]):
        fields = fields[1:]
    try:
        if len(fields) < 2:
            raise ValueError("expected '<type> <base64>'")
        return paramiko.PKey.from_type_string(fields[0], base64.b64decode(fields[1], validate=True))
    except (ValueError, paramiko.SSHException, UnknownKeyType) as exc:
        raise UsageError(
            "host-key-invalid",
            f"the pinned host key is not an OpenSSH public key line: {exc}",
            hint="pin the line from the host's /etc/ssh/ssh_host_ed25519_key.pub",
            details={"expected": "ssh-ed25519 AAAA...", "actual": line[:80]},
        ) from exc


def _looks_like_key_type(token: str) -> bool:
    return token.startswith(("ssh-", "ecdsa-", "sk-", "rsa-"))


def same_key(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return a.get_name() == b.get_name() and a.asbytes() == b.asbytes()


def parse_url(name: str, url: str) -> tuple[str, str, int]:
    """(user, host, port) of ``ssh://USER@HOST[:PORT]``. Raises ``UsageError('bad-url')``."""
    parts = urlsplit(url)
    try:
        port = parts.port or 22
    except ValueError:
        port = -1
    if parts.scheme != "ssh" or not parts.hostname or not parts.username or port < 1:
        raise UsageError(
            "bad-url",
            f"target {name!r} has URL {url!r}",
            hint="write it as ssh://USER@HOST:PORT",
            details={"expected": "ssh://USER@HOST:PORT", "actual": url},
        )
    return parts.username, parts.hostname, port


def load_identity(name: str, path: str | None) -> paramiko.PKey:
    """The private key a target logs in with. Raises ``UsageError('identity-missing')`` or
    ``OperationalError('identity-unreadable')``."""
    import paramiko

    if not path:
        raise UsageError(
            "identity-missing",
            f"target {name!r} has no identity (private key file) to log in with",
            hint="set identity in its inventory entry to the private key path",
        )
    try:
        return paramiko.PKey.from_path(path)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise OperationalError(
            "identity-unreadable",
            f"cannot load the SSH identity {path}: {exc}",
            hint="check that the file exists, is readable and is an unencrypted OpenSSH private key",
            details={"path": path},
        ) from exc
