"""Audit events from the gateway's access log: ``egress.allowed``, ``egress.denied``, ``classifier.denied``.

Envoy writes one JSON line per request (``controlplane.boundary.routes.LOG_FIELDS``), with the
listener's identity (the profile or job, from the address it called, not from anything it sent)
and the policy generation in force. A request routed upstream is ``egress.allowed`` (whatever
the upstream answered); one Envoy answered itself with a reason is ``egress.denied``, or
``tool.denied`` for an MCP reason (``mcprules.REASONS``, or the pinning service's
``mcppin.REASONS`` from its ``x-avm-pin`` response header), with the tool it named; an MCP
request Envoy could not hand to the pinning service (down: a 503 with an upstream-connection
flag, nothing reached the server) is ``tool.denied`` with ``mcp-pin-unavailable``.
A request an inspected name refused on its classifier's verdict (``sensitivity-exceeds-ceiling``)
is ``classifier.denied``, with the verdict's level, the finding kinds and the classifier (never
what matched: the classifier reports kinds and offsets only). No verdict at all is an
``egress.denied`` with ``classifier-unavailable`` (or ``body-too-large-to-inspect``, 413).
Connections refused before any HTTP (an unlisted name: no TLS session) do not reach this log.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from controlplane.boundary import contentgate, mcppin
from controlplane.boundary.budget import BUDGETS
from controlplane.boundary.budget import REASON as BUDGET_REASON
from controlplane.boundary.mcprules import REASONS as TOOL_REASONS
from controlplane.boundary.routes import REASONS

_DENIALS = (*REASONS, *contentgate.REASONS)
PIN_UNAVAILABLE = "mcp-pin-unavailable"
# Envoy's response flags for "no connection to the upstream" (here: the pinning service)
_PIN_DOWN_FLAGS = {"UF", "UH", "URX", "UO"}


@dataclasses.dataclass(frozen=True)
class Event:
    event: str  # egress.allowed | egress.denied | classifier.denied | tool.denied
    identity: str
    host: str
    method: str
    path: str  # without its query string
    code: int
    reason: str  # "allowed" or one of routes.REASONS
    policy: str
    t: str
    # an inspected name's verdict (empty elsewhere): level, finding kinds, classifier name@version
    sensitivity: str = ""
    findings: tuple[str, ...] = ()
    classifier: str = ""
    tool: str = ""  # an MCP request's tool (tools/call) or method, when the chain parses MCP
    bytes_sent: int = 0  # request body bytes, from the agent
    bytes_received: int = 0  # response body bytes, to the agent
    input_tokens: int | None = None  # as the upstream's usage object reported them
    output_tokens: int | None = None
    budget: str = ""  # the budget a budget-exhausted 429 names

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.tool:  # only a request to an MCP server names one
            del out["tool"]
        return out


def parse_line(line: str) -> Event | None:
    """One access-log line as an event; None for a line that is not one of the gateway's."""
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    if not isinstance(raw, dict) or "identity" not in raw:
        return None
    reason = str(raw.get("reason") or "")
    if not reason and raw.get("pin") in mcppin.REASONS:  # refused behind Envoy, on the response path
        reason = str(raw["pin"])
    if reason.startswith("boundary-"):  # avm.boundary (GET /policy, POST /requests): nothing left
        return None
    code = int(raw.get("code") or 0)
    budget = str(raw.get("budget") or "")
    if code in (413, 429) and budget in BUDGETS:  # only the gateway sets x-avm-budget (boundary.budget)
        reason = BUDGET_REASON
    details = str(raw.get("details") or "")
    if not reason and details.startswith("ext_authz"):  # the classifier refused, failed or timed out
        reason = "classifier-unavailable"
    elif not reason and code == 413 and details == "request_payload_too_large":  # no verdict asked
        reason = "body-too-large-to-inspect"
    elif reason in ("", "allowed") and code == 503 and raw.get("rpc") and _pin_down(raw):
        reason = PIN_UNAVAILABLE
    tool_denied = reason in TOOL_REASONS or reason in mcppin.REASONS or reason == PIN_UNAVAILABLE
    denied = tool_denied or reason in _DENIALS or reason == BUDGET_REASON
    if tool_denied:
        kind = "tool.denied"
    else:
        kind = "classifier.denied" if reason == "sensitivity-exceeds-ceiling" else "egress.denied"
    findings = str(raw.get("findings") or "")
    return Event(
        kind if denied else "egress.allowed",
        str(raw["identity"]),
        str(raw.get("host") or raw.get("sni") or ""),
        str(raw.get("method") or ""),
        str(raw.get("path") or ""),
        code,
        reason if denied else "allowed",
        str(raw.get("policy") or ""),
        str(raw.get("t") or ""),
        sensitivity=str(raw.get("sensitivity") or ""),
        findings=tuple(k for k in findings.split(",") if k and k != "-"),
        classifier=str(raw.get("classifier") or ""),
        tool=str(raw.get("tool") or raw.get("rpc") or ""),
        bytes_sent=_int(raw.get("bytes_sent")) or 0,
        bytes_received=_int(raw.get("bytes_received")) or 0,
        input_tokens=_int(raw.get("input_tokens")),
        output_tokens=_int(raw.get("output_tokens")),
        budget=budget if reason == BUDGET_REASON else "",
    )


def _pin_down(raw: dict[str, Any]) -> bool:
    """An MCP request's 503 with an upstream-connection flag: the pinning service (every MCP
    server's only cluster) did not answer; the pin service's own refusals carry ``x-avm-pin``."""
    return not raw.get("pin") and bool(_PIN_DOWN_FLAGS & set(str(raw.get("flags") or "").split(",")))


def _int(value: object) -> int | None:
    """A count from the log (Envoy writes numbers, or null / "-" when it has none)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


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
        "denied": [e.to_dict() for e in events if e.event != "egress.allowed"],
    }
