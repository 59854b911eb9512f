"""The one seam through which the control plane reaches a host: ``run``, ``put``, ``get``.

Facts, apply steps, units and jobs use nothing else, so the same code drives a local test host,
an nspawn container, a QEMU VM or a cloud VM. Commands are argv lists, never shell strings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, Self, runtime_checkable

from controlplane.errors import CommandFailed

MASK = "***"


def mask(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with every occurrence of a secret value replaced by ``MASK``: the one masker for
    argv, captured output, logs, errors and receipts."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def masked(argv: Sequence[str], secrets: Sequence[str] = ()) -> list[str]:
    """argv with every occurrence of a secret value replaced, for logs, errors and receipts."""
    return [mask(arg, secrets) for arg in argv]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a command did. ``argv`` is already masked; it is safe to log and to record."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self, hint: str = "") -> RunResult:
        """Return self, or raise ``CommandFailed`` (rc, stdout and stderr kept) if rc != 0."""
        if self.rc != 0:
            raise CommandFailed(self.argv, self.rc, self.stdout, self.stderr, hint=hint)
        return self


@runtime_checkable
class Transport(Protocol):
    """A connection to one host; a context manager (``with connect(target) as host:``).

    ``run`` raises ``CommandTimeout`` when the deadline passes (the command is killed) and
    ``OperationalError`` when the host cannot be reached; a non-zero exit is *not* an error
    here: callers decide with ``RunResult.check``.
    """

    url: str

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 60.0,
        secrets: Sequence[str] = (),
    ) -> RunResult: ...

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` atomically (temp file + rename) with ``mode``."""
        ...

    def get(self, path: str) -> bytes:
        """Read a whole file. Raises ``OperationalError('remote-file-missing')`` if absent."""
        ...

    def close(self) -> None:
        """Release the connection; idempotent. ``with`` calls it on every path."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
