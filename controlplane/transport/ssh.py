"""``ssh://USER@HOST:PORT``: one pinned, reused paramiko connection per host.

The host key comes from the inventory and is pinned before the first packet: paramiko's
``RejectPolicy`` refuses any other key, and a target without a pinned key is refused before
connecting. This module is the only place a shell string is built (``shlex.join``), because an
SSH ``exec`` request carries one string that the remote login shell parses.

paramiko is imported inside the functions that need it, so ``avm --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets as _secrets
import shlex
import stat
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from controlplane.errors import CommandTimeout, OperationalError, RefusedError
from controlplane.transport import channel
from controlplane.transport.banner import wait_for_ssh
from controlplane.transport.base import RunResult, mask, masked
from controlplane.transport.hostkey import fingerprint, load_identity, parse_host_key, parse_url, same_key

if TYPE_CHECKING:
    import paramiko

    from controlplane.transport.inventory import Target

# The remote `timeout` sends TERM at the deadline and KILL this many seconds later.
KILL_AFTER_S = 2
# The local backstop waits this much past the remote kill before giving up on the channel, for a
# host that stopped answering (the remote `timeout` is what normally ends the command).
LOCAL_GRACE_S = 1.0
# Exit statuses of GNU `timeout` when it had to end the command (TERM, or KILL after -k).
_TIMED_OUT_RCS = (124, 128 + 9)


def preload() -> None:
    """Import paramiko now (about 0.23 s), e.g. while a VM boots, instead of at the first connect."""
    import paramiko  # noqa: F401


class SshTransport:
    """A pinned SSH connection to one host. Use as a context manager, or call ``close``."""

    def __init__(
        self,
        url: str,
        *,
        host: str,
        port: int,
        user: str,
        host_key: paramiko.PKey,
        identity: paramiko.PKey,
        connect_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.host = host
        self.port = port
        self.user = user
        self._host_key = host_key
        self._identity = identity
        self._connect_timeout = connect_timeout
        # how long to wait for the server's greeting; boot polling sets it short, because a VM
        # whose network is not up yet holds a forwarded connection open without a word
        self.banner_timeout: float | None = None
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self.connect_s = 0.0

    @classmethod
    def from_target(
        cls, target: Target, *, connect_timeout: float = 10.0, banner_timeout: float | None = None
    ) -> SshTransport:
        """Connect to an inventory target.

        Raises ``RefusedError('host-key-not-pinned')`` without connecting when the target has no
        pinned key; ``UsageError`` for a bad URL, key line or identity; and what ``connect``
        raises.
        """
        user, hostname, port = parse_url(target.name, target.url)
        if not target.host_key:
            raise RefusedError(
                "host-key-not-pinned",
                f"target {target.name!r} ({target.url}) has no pinned host key; "
                "avm does not trust a key on first use",
                hint="add the host's public key line (ssh-ed25519 AAAA...) as host_key in its inventory entry"
                " (nothing was sent to the host)",
                details={"expected": "a pinned host key", "actual": None},
            )
        host_key = parse_host_key(target.host_key)
        identity = load_identity(target.name, target.identity)
        transport = cls(
            target.url,
            host=hostname,
            port=port,
            user=user,
            host_key=host_key,
            identity=identity,
            connect_timeout=connect_timeout,
        )
        transport.banner_timeout = banner_timeout
        transport.connect()
        return transport

    def __enter__(self) -> SshTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Open the connection (again, if it dropped).

        Raises ``RefusedError('host-key-mismatch')`` when the server presents any key but the
        pinned one (both fingerprints are shown), ``OperationalError('host-unreachable')`` when
        no SSH server answers, ``OperationalError('ssh-auth-failed')`` when the identity is not
        accepted.
        """
        import paramiko

        self.close()
        client = paramiko.SSHClient()
        client.get_host_keys().add(self._known_hosts_name(), self._host_key.get_name(), self._host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        start = time.monotonic()
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                pkey=self._identity,
                timeout=self._connect_timeout,
                banner_timeout=self.banner_timeout or self._connect_timeout,
                auth_timeout=max(self._connect_timeout, 10.0),
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise self._mismatch(exc.key) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise OperationalError(
                "ssh-auth-failed",
                f"{self.user}@{self.host}:{self.port} did not accept the identity "
                f"({fingerprint(self._identity)})",
                hint="check that the identity's public key is in the user's authorized_keys on the host",
                details={"url": self.url, "identity": fingerprint(self._identity)},
            ) from exc
        except paramiko.SSHException as exc:
            # RejectPolicy raises a bare SSHException when the server offers a key of a type
            # that is not pinned; the transport still holds the key it was shown.
            offered = _remote_key(client)
            client.close()
            if offered is not None and not same_key(offered, self._host_key):
                raise self._mismatch(offered) from None
            raise self._unreachable(exc) from exc
        except (OSError, EOFError) as exc:
            client.close()
            raise self._unreachable(exc) from exc
        self.connect_s = time.monotonic() - start
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(30)
        self._client = client

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 60.0,
        secrets: Sequence[str] = (),
    ) -> RunResult:
        """Run argv on the host under ``timeout -k 2 <timeout>`` and collect its output.

        Raises ``CommandTimeout`` when the remote ``timeout`` had to end the command, or when the
        channel stays silent past the deadline plus the kill grace (the host hung);
        ``OperationalError('tool-missing')`` when the program is not on the host's PATH;
        ``OperationalError('host-unreachable')`` when the connection fails.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive (GNU timeout treats 0 as 'no limit')")
        args = [str(a) for a in argv]
        shown = masked(args, secrets)
        command = shlex.join(["timeout", "-k", str(KILL_AFTER_S), f"{timeout:.3f}", *args])
        start = time.monotonic()
        rc, out, err = self._exec(
            command, shown, stdin, start + timeout + KILL_AFTER_S + LOCAL_GRACE_S, timeout, secrets
        )
        duration = time.monotonic() - start
        stdout, stderr = _text(out, secrets), _text(err, secrets)
        # A command that exits 124/137 on its own before the deadline is not a timeout.
        if rc in _TIMED_OUT_RCS and duration >= timeout:
            raise CommandTimeout(shown, timeout, stdout, stderr)
        if rc == 127 and stderr.startswith("timeout: failed to run command"):
            raise OperationalError(
                "tool-missing",
                f"`{shown[0]}` is not installed or not on PATH on {self.url}",
                hint="install it on the host (the golden image lists the tools avm needs)",
                details={"argv": shown, "stderr": stderr[-800:]},
            )
        return RunResult(argv=shown, rc=rc, stdout=stdout, stderr=stderr, duration_s=duration)

    def login_check(self, timeout: float = 10.0) -> float:
        """Prove that a login works, at the least cost to the host: authenticate, open a session
        and have the login shell run ``true`` (its builtin: no program is exec'd, which under TCG
        is about 0.2 s less than ``run(["true"])``). Returns the seconds it took.

        Raises ``OperationalError('ssh-login-failed')`` when the shell does not exit 0,
        ``CommandTimeout`` when the shell has not exited ``timeout`` seconds after the session
        was asked for, and what
        ``connect`` raises."""
        start = time.monotonic()
        rc, _out, err = self._exec("true", ["true"], None, start + timeout, timeout, ())
        if rc != 0:
            raise OperationalError(
                "ssh-login-failed",
                f"{self.url}: the login shell ran `true` and exited {rc}",
                hint="check the user's login shell on the host",
                details={"rc": rc, "stderr": _text(err, ())[-400:]},
            )
        return time.monotonic() - start

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` atomically: a temp file in the same directory, chmod before
        the data goes in, then ``posix-rename``. Missing parent directories are created.
        Raises ``OperationalError('remote-write-failed')``."""
        sftp = self._sftp_client()
        parent, name = posixpath.split(path)
        tmp = posixpath.join(parent, f".{name}.{_secrets.token_hex(6)}.tmp")
        try:
            self._makedirs(sftp, parent or ".")
            with sftp.open(tmp, "wb") as fh:
                fh.chmod(mode)
                fh.set_pipelined(True)
                fh.write(data)
            sftp.posix_rename(tmp, path)
        except OSError as exc:
            _remove_quietly(sftp, tmp)
            raise OperationalError(
                "remote-write-failed",
                f"cannot write {path} on {self.url}: {exc}",
                hint="check that the directory is writable by the SSH user",
                details={"path": path},
            ) from exc
        except BaseException:
            _remove_quietly(sftp, tmp)
            raise

    def get(self, path: str) -> bytes:
        """Read a whole file. Raises ``OperationalError('remote-file-missing')`` if absent."""
        sftp = self._sftp_client()
        try:
            with sftp.open(path, "rb") as fh:
                fh.prefetch()
                return fh.read()
        except FileNotFoundError:
            raise OperationalError("remote-file-missing", f"{path} does not exist on {self.url}") from None
        except OSError as exc:
            raise OperationalError(
                "remote-read-failed", f"cannot read {path} on {self.url}: {exc}", details={"path": path}
            ) from exc

    # -- internals -------------------------------------------------------------------------

    def _exec(
        self,
        command: str,
        shown: list[str],
        stdin: bytes | None,
        backstop: float,
        timeout: float,
        secrets: Sequence[str],
    ) -> tuple[int, list[bytes], list[bytes]]:
        """One session channel (``transport.channel``). ``CommandTimeout`` once ``backstop``
        (monotonic) passes with the channel open."""
        import paramiko

        try:
            chan = self._transport().open_session(timeout=self._connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise self._unreachable(exc) from exc
        try:
            return channel.exchange(chan, command, stdin, backstop)
        except channel.Silent as silent:
            raise self._timeout(shown, timeout, silent.out, silent.err, secrets) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise self._unreachable(exc) from exc
        finally:
            chan.close()

    def _transport(self) -> paramiko.Transport:
        if self._client is None or not _active(self._client):
            self.connect()
        assert self._client is not None
        transport = self._client.get_transport()
        assert transport is not None
        return transport

    def _sftp_client(self) -> paramiko.SFTPClient:
        import paramiko

        if self._sftp is None or self._client is None or not _active(self._client):
            transport = self._transport()
            try:
                self._sftp = paramiko.SFTPClient.from_transport(transport)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise OperationalError(
                    "sftp-unavailable",
                    f"{self.url} refused an SFTP session: {exc}",
                    hint="enable `Subsystem sftp internal-sftp` in the host's sshd_config",
                ) from exc
            if self._sftp is None:
                raise OperationalError("sftp-unavailable", f"{self.url} refused an SFTP session")
        return self._sftp

    @staticmethod
    def _makedirs(sftp: paramiko.SFTPClient, directory: str) -> None:
        try:
            if stat.S_ISDIR(sftp.stat(directory).st_mode or 0):
                return
        except FileNotFoundError:
            SshTransport._makedirs(sftp, posixpath.dirname(directory.rstrip("/")) or "/")
            sftp.mkdir(directory)

    def _known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def _mismatch(self, actual: paramiko.PKey) -> RefusedError:
        expected_fp, actual_fp = fingerprint(self._host_key), fingerprint(actual)
        return RefusedError(
            "host-key-mismatch",
            f"{self.host}:{self.port} presented host key {actual.get_name()} {actual_fp}, "
            f"expected the pinned {self._host_key.get_name()} {expected_fp}",
            hint="if the host was rebuilt, re-pin its key in the inventory; otherwise treat it as an attack",
            details={"url": self.url, "expected": expected_fp, "actual": actual_fp},
        )

    def _unreachable(self, exc: BaseException) -> OperationalError:
        return OperationalError(
            "host-unreachable",
            f"no working SSH connection to {self.host}:{self.port}: {exc or type(exc).__name__}",
            hint="check that the host is up and sshd listens on that port (`avm vm status`)",
            details={"url": self.url, "error": type(exc).__name__},
        )

    def _timeout(
        self, shown: list[str], timeout: float, out: list[bytes], err: list[bytes], secrets: Sequence[str]
    ) -> CommandTimeout:
        # The host stopped answering; drop the connection so the next call starts clean.
        self.close()
        return CommandTimeout(shown, timeout, _text(out, secrets), _text(err, secrets))


def _active(client: paramiko.SSHClient) -> bool:
    transport = client.get_transport()
    return transport is not None and transport.is_active()


def _remote_key(client: paramiko.SSHClient) -> paramiko.PKey | None:
    transport = client.get_transport()
    if transport is None:
        return None
    try:
        return transport.get_remote_server_key()
    except Exception:
        # No key was exchanged; the caller reports the original error.
        return None


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    with contextlib.suppress(OSError):
        sftp.remove(path)


def _text(chunks: list[bytes], secrets: Sequence[str]) -> str:
    return mask(b"".join(chunks).decode("utf-8", "replace"), secrets)


__all__ = ["SshTransport", "fingerprint", "parse_host_key", "wait_for_ssh"]
