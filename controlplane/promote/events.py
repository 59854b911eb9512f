"""Tier-1 audit events collected from the gateways on a host (the vocabulary: evidence.events)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from controlplane.evidence.events import parse_journal
from controlplane.promote.layout import unit_name
from controlplane.transport.base import Transport


def gateway_events(host: Transport, profiles: Sequence[str], since: str) -> list[dict[str, Any]]:
    """Gateway audit events on ``host`` since ``since`` (ISO 8601), one journalctl call."""
    if not profiles:
        return []
    started = dt.datetime.fromisoformat(since.replace("Z", "+00:00"))
    argv = ["journalctl", "--no-pager", "-q", "-o", "cat", f"--since=@{int(started.timestamp())}"]
    for name in profiles:
        argv += ["-u", unit_name(name)]
    result = host.run(argv, timeout=60)
    return parse_journal(result.stdout, profiles) if result.rc == 0 else []
