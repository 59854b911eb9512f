"""Audit events from the gateway's access log: ``egress.allowed`` and ``egress.denied``.

Envoy writes one JSON line per request (``controlplane.boundary.routes.LOG_FIELDS``), with the
listener's identity (the profile or job, from the address it called, not from anything it sent)
and the policy generation in force. A request routed upstream is ``egress.allowed`` (whatever
the upstream answered); one Envoy answered itself with a reason is ``egress.denied``.
Connections refused before any HTTP (an unlisted name: no TLS session) do not reach this log.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from controlplane.boundary.routes import REASONS


@dataclasses.dataclass(frozen=True)
class Event:
    event: str  # egress.allowed | egress.denied
    identity: str
    host: str
    method: str
    path: str  # without its query string
    code: int
    reason: str  # "allowed" or one of routes.REASONS
    policy: str
    t: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_line(line: str) -> Event | None:
    """One access-log line as an event; None for a line that is not one of the gateway's."""
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    if not isinstance(raw, dict) or "identity" not in raw:
        return None
    reason = str(raw.get("reason") or "")
    if reason.startswith("boundary-"):  # avm.boundary (GET /policy, POST /requests): nothing left
        return None
    code = int(raw.get("code") or 0)
    denied = reason in REASONS
    return Event(
        "egress.denied" if denied else "egress.allowed",
        str(raw["identity"]),
        str(raw.get("host") or raw.get("sni") or ""),
        str(raw.get("method") or ""),
        str(raw.get("path") or ""),
        code,
        reason if denied else "allowed",
        str(raw.get("policy") or ""),
        str(raw.get("t") or ""),
    )


def read(
    path: Path, *, identity: str | None = None, timeout: float = 0.0, want: int = 0, offset: int = 0
) -> list[Event]:
    """The events in ``path`` from byte ``offset`` (of one ``identity`` if given). Waits up to
    ``timeout`` seconds for at least ``want`` of them: Envoy flushes its access log on an interval."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                lines = fh.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        out = [e for e in map(parse_line, lines) if e and (identity is None or e.identity == identity)]
        if len(out) >= want or time.monotonic() >= deadline:
            return out
        time.sleep(0.05)


def summary(events: list[Event]) -> dict[str, Any]:
    """What a receipt carries: every denial, and a count of allowed requests per destination."""
    allowed = Counter(f"{e.method} {e.host}" for e in events if e.event == "egress.allowed")
    return {
        "allowed": dict(sorted(allowed.items())),
        "denied": [e.to_dict() for e in events if e.event == "egress.denied"],
    }
