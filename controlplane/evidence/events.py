"""The fixed audit event vocabulary, and the pure parsers that turn raw records into events.

Every event in a receipt's ``predicate.events`` has a ``type`` from ``EVENT_TYPES`` (documented
in docs/governance.md; a test fails if a receipt of a run carries any other type, or if the
document and this table differ). Gateways write their events (tool denials, refusal to start)
to the journal as single lines ``avm-event {json}``; ``avm status`` collects those since the
last apply into its own receipt, so a denial on the host becomes evidence in the ledger.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

EVENT_PREFIX = "avm-event "
# type -> (emitted by, fields)
EVENT_TYPES: dict[str, tuple[str, str]] = {
    "gate.decision": (
        "promote (plan receipt; gate=observed in the apply receipt)",
        "gate, outcome (pass/fail/deferred), and the gate's inputs",
    ),
    "approval.signed": ("avm approve (approval receipt)", "approver key id, plan digest, ttl_s"),
    "approval.accepted": ("promote --apply (apply receipt)", "approver, receipt, expires, plan"),
    "secret.load": ("promote --apply (apply receipt)", "profile, credential, ref, version; never the value"),
    "host.write": ("promote --apply (apply receipt)", "path, digest"),
    "host.write-credentials": ("promote --apply (apply receipt)", "profile, paths, values: not recorded"),
    "promotion.halted": ("promote --apply (apply receipt)", "reason, skipped profiles"),
    "rollback.auto": ("promote --apply (apply receipt)", "profile, reason, to (previous release)"),
    "rollback.run": ("avm rollback --apply (apply receipt)", "commit, profiles"),
    "alignment.check": ("avm status (status receipt)", "in_sync, findings, against (apply receipt)"),
    "tool.denied": (
        "the egress gateway's MCP rules and pinning service (avm job run: job receipt; Tier-1 access "
        "log -> avm status receipt); mcp_guard via journal (defence in depth)",
        "job or profile, tool, reason; from the gateway also host, method, path, code, policy",
    ),
    "gateway.refused": ("gateway via journal -> avm status receipt", "profile, reason (invalid policy)"),
    "egress.denied": (
        "avm job run (job receipt); avm status (Tier-1 gateway access log)",
        "destination, packets (nftables counter / log); by name: host, method, path, code, reason, policy",
    ),
    "classifier.denied": (
        "avm job run (job receipt); avm status (Tier-1 gateway access log)",
        "job or profile, host, method, path, code, reason, policy, sensitivity, findings (kinds only), "
        "classifier",
    ),
    "permission.requested": (
        "avm egress requests (egress-requests receipt)",
        "request id, profile, state (pending, approved, denied, applied, expired, invalid)",
    ),
    "permission.denied": ("avm egress deny (egress-request-denied receipt)", "request id, profile, reason"),
    "egress.allowed": (
        "avm job run (job receipt); avm status (Tier-1 gateway access log)",
        "job or profile, destination (method host), count, policy (gateway log)",
    ),
}

COLLECT_LIMIT = 200


def parse_journal(text: str, profiles: Sequence[str]) -> list[dict[str, Any]]:
    """Gateway events from ``journalctl -o cat`` output: known types, known profiles only."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        _, sep, body = line.partition(EVENT_PREFIX)
        if not sep:
            continue
        try:
            event = json.loads(body)
        except ValueError:
            continue
        if (
            isinstance(event, dict)
            and event.get("type") in ("tool.denied", "gateway.refused")
            and event.get("profile") in profiles
        ):
            out.append({k: str(v)[:300] for k, v in event.items()})
    return out[-COLLECT_LIMIT:]


def egress_denied(denials: Sequence[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    """``egress.denied`` events from ``nftrules.parse_denials`` output (the job's nftables
    denied-flow set with per-destination counters). The job runner records each in its receipt:
    ``for e in egress_denied(...): step.event(e.pop("type"), **e)``."""
    out = []
    for d in denials:
        port = f":{d['dport']}" if d.get("dport") is not None else ""
        out.append(
            {
                "type": "egress.denied",
                "job": job_id,
                "destination": f"{d['daddr']}{port}/{d['proto']}",
                "class": d.get("class", "denied_other"),
                "packets": int(d.get("packets", 0)),
            }
        )
    return out[:COLLECT_LIMIT]
