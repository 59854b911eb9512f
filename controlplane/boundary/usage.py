"""Usage at the boundary: what each identity sent and received, per destination, and tokens.

Counted by the gateway, outside the agent, from its access log (``events.Event``): requests,
allowed and denied (by reason), body bytes the agent sent (Envoy's ``%BYTES_RECEIVED%``) and
received (``%BYTES_SENT%``), and token counts where the upstream's JSON (or event-stream)
response carries a usage object. The tokens are read in Envoy by ``LUA`` (a response filter
in every chain): it scans the body chunk by chunk as it streams past (nothing is buffered or
changed) for OpenAI ``usage.prompt_tokens`` / ``completion_tokens`` and Anthropic
``usage.input_tokens`` / ``output_tokens``, keeps the last value of each (a stream's final
``message_delta`` carries the total), and sets them as dynamic metadata ``avm.usage`` that the
access log writes. They are what the upstream reported, not a count the gateway made.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Iterable
from typing import Any

from controlplane.boundary.events import Event
from controlplane.errors import UsageError

_T = "type.googleapis.com/envoy."
NAMESPACE = "avm.usage"
LUA = """\
local KEYS = {prompt_tokens = "input_tokens", completion_tokens = "output_tokens",
              input_tokens = "input_tokens", output_tokens = "output_tokens"}
function envoy_on_request(handle)
end
function envoy_on_response(handle)
  local ctype = handle:headers():get("content-type") or ""
  if not (string.find(ctype, "json", 1, true) or string.find(ctype, "event-stream", 1, true)) then
    return
  end
  local found, tail, seen = {}, "", false
  for chunk in handle:bodyChunks() do
    local text = tail .. chunk:getBytes(0, chunk:length())
    for key, value in string.gmatch(text, '"([a-z_]+_tokens)"%s*:%s*(%d+)') do
      if KEYS[key] then
        found[KEYS[key]] = tonumber(value)
        seen = true
      end
    end
    tail = string.sub(text, -64)
  end
  if seen then
    local meta = handle:streamInfo():dynamicMetadata()
    for key, value in pairs(found) do
      meta:set("avm.usage", key, value)
    end
  end
end
"""


def lua_filter() -> dict[str, Any]:
    """The token-reading response filter (last before the router)."""
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": _T + "extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA},
        },
    }


@dataclasses.dataclass
class Row:
    """One identity's use of one destination."""

    identity: str
    destination: str
    requests: int = 0
    allowed: int = 0
    denied: int = 0
    denied_by: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    first: str = ""
    last: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(events: Iterable[Event]) -> list[Row]:
    """A row per (identity, destination host), sorted; bytes and tokens summed over requests."""
    rows: dict[tuple[str, str], Row] = {}
    for e in events:
        row = rows.setdefault((e.identity, e.host), Row(e.identity, e.host, first=e.t))
        row.requests += 1
        if e.event == "egress.denied":
            row.denied += 1
            row.denied_by[e.reason] = row.denied_by.get(e.reason, 0) + 1
        else:
            row.allowed += 1
        row.bytes_sent += e.bytes_sent
        row.bytes_received += e.bytes_received
        row.input_tokens += e.input_tokens or 0
        row.output_tokens += e.output_tokens or 0
        row.first, row.last = min(row.first, e.t), max(row.last, e.t)
    return [rows[k] for k in sorted(rows)]


def totals(rows: Iterable[Row]) -> dict[str, int]:
    keys = ("requests", "allowed", "denied", "bytes_sent", "bytes_received", "input_tokens", "output_tokens")
    out = dict.fromkeys(keys, 0)
    for row in rows:
        for k in keys:
            out[k] += getattr(row, k)
    return out


def report(events: Iterable[Event]) -> dict[str, Any]:
    """What a receipt (and ``avm usage --json``) carries: the rows and their totals."""
    rows = summarize(events)
    return {"rows": [r.to_dict() for r in rows], "totals": totals(rows)}


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table (``avm usage``)."""
    head = ("IDENTITY", "DESTINATION", "REQ", "DENIED", "SENT", "RECEIVED", "IN_TOK", "OUT_TOK")
    body = [
        (
            r["identity"],
            r["destination"],
            str(r["requests"]),
            str(r["denied"])
            + (
                " (" + ", ".join(f"{k} {v}" for k, v in sorted(r["denied_by"].items())) + ")"
                if r["denied_by"]
                else ""
            ),
            str(r["bytes_sent"]),
            str(r["bytes_received"]),
            str(r["input_tokens"]),
            str(r["output_tokens"]),
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in (head, *body)
    )


def since_stamp(value: str, now: datetime.datetime | None = None) -> str:
    """``--since`` as the access log's time format (``2026-12-02T05:03:56.123Z``), to compare
    with each line's ``t``: an ISO 8601 time (a naive one is UTC) or a duration back from now
    (``90s``, ``30m``, ``2h``, ``7d``). Raises ``UsageError('usage-since-invalid')``."""
    now = now or datetime.datetime.now(datetime.UTC)
    match = _DURATION_RE.fullmatch(value.strip())
    if match:
        when = now - datetime.timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    else:
        try:
            when = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(
                "usage-since-invalid",
                f"--since: expected an ISO 8601 time or a duration (90s, 30m, 2h, 7d), got {value!r}",
                hint="e.g. --since 2026-12-01T09:00:00Z or --since 24h",
                details={"expected": "ISO 8601 time or N[smhd]", "actual": value},
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
    when = when.astimezone(datetime.UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z"


_DURATION_RE = re.compile(r"^([0-9]{1,9})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
