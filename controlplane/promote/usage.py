"""Tier-1 usage: what each profile sent through the host's egress gateway, from its access log.

Read-only on the host, as root (the log is root's; it holds no header values). The gateway's
own counts (``controlplane.boundary.usage``): requests, denials by reason, body bytes each way,
and the upstream's token counts, per profile and destination, for the lines since a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controlplane.boundary import events, tier1, usage

if TYPE_CHECKING:
    from controlplane.transport.base import Transport

READ_LIMIT = 64 << 20  # the newest 64 MiB of the log; older lines are not counted (``truncated``)


def read(host: Transport, since: str = "") -> dict[str, Any]:
    """``{since, log_bytes, truncated, rows, totals}`` for the profiles' lines with ``t >= since``
    (``since`` in the log's own format, ``usage.since_stamp``; empty: the whole log read)."""
    log = str(tier1.ACCESS_LOG)
    size_out = host.run(["stat", "-c", "%s", log], timeout=30)
    size = int(size_out.stdout.strip()) if size_out.ok and size_out.stdout.strip().isdigit() else 0
    text = host.run(["tail", "-c", str(READ_LIMIT), log], timeout=120).stdout if size else ""
    complete, _, _ = text.rpartition("\n")  # a line still being written is not counted
    lines = complete.splitlines()[1:] if size > READ_LIMIT else complete.splitlines()  # a cut first line
    seen = [
        e
        for e in map(events.parse_line, lines)
        if e is not None and e.identity.startswith("profile:") and e.t >= since
    ]
    out = usage.report(seen)
    oldest = seen[0].t if seen else ""
    return {"since": since, "log_bytes": size, "truncated": size > READ_LIMIT and oldest > since, **out}
