"""One SSH session channel's exchange: run a command, feed it stdin, collect stdout and stderr,
and wait for its exit status, all before a deadline (``transport.ssh`` owns the connection and
turns what happens here into avm's errors)."""

from __future__ import annotations

import select
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import paramiko

_CHUNK = 1 << 15


class Silent(Exception):
    """The deadline passed with the channel still open; what arrived until then."""

    def __init__(self, out: list[bytes], err: list[bytes]) -> None:
        super().__init__("the channel stayed open past its deadline")
        self.out = out
        self.err = err


def exchange(
    chan: paramiko.Channel, command: str, stdin: bytes | None, deadline: float
) -> tuple[int, list[bytes], list[bytes]]:
    """Send ``command`` and ``stdin`` on ``chan``; returns (exit status, stdout chunks, stderr
    chunks). Raises ``Silent`` once ``deadline`` (monotonic) passes, and what paramiko raises."""
    out: list[bytes] = []
    err: list[bytes] = []
    chan.exec_command(command)
    pending = stdin or b""
    if not pending:
        chan.shutdown_write()
    while True:
        if pending and chan.send_ready():
            sent = chan.send(pending[:_CHUNK])
            pending = pending[sent:]
            if not pending:
                chan.shutdown_write()
        while chan.recv_ready():
            out.append(chan.recv(_CHUNK))
        while chan.recv_stderr_ready():
            err.append(chan.recv_stderr(_CHUNK))
        if chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready():
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Silent(out, err)
        # While stdin is pending, wake often to send; otherwise sleep until data or EOF.
        select.select([chan], [], [], min(remaining, 0.01) if pending else remaining)
    if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
        raise Silent(out, err)
    return chan.recv_exit_status(), out, err
