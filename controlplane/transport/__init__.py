"""Transports, picked by URL scheme from a plain table: ``local://`` and ``ssh://``."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from controlplane.errors import UsageError
from controlplane.transport.base import RunResult, Transport, masked
from controlplane.transport.local import LocalTransport

if TYPE_CHECKING:
    from controlplane.transport.inventory import Target

__all__ = ["LocalTransport", "RunResult", "Transport", "connect", "masked"]

SCHEMES = ("local", "ssh")


def connect(target: Target, *, connect_timeout: float = 10.0) -> Transport:
    """Open a transport to an inventory target.

    Raises ``UsageError('unknown-scheme')`` for a URL avm cannot reach, and whatever the
    transport raises when the host refuses (see ``SshTransport``).
    """
    parts = urlsplit(target.url)
    if parts.scheme == "local":
        return LocalTransport()
    if parts.scheme == "ssh":
        from controlplane.transport.ssh import SshTransport

        return SshTransport.from_target(target, connect_timeout=connect_timeout)
    raise UsageError(
        "unknown-scheme",
        f"cannot reach {target.url!r}: unknown scheme {parts.scheme!r}",
        hint=f"supported schemes: {', '.join(s + '://' for s in SCHEMES)}",
        details={"expected": list(SCHEMES), "actual": parts.scheme},
    )
