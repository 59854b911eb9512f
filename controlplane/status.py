"""``avm status``: the live host against what the last apply receipt says it left. Read-only.

One round trip gathers every fact; ``drift.find_drift`` compares them with the recorded state.
Exit 0 in sync, 2 drift, 1 error. It never writes to the host; it records a ``status`` receipt.
"""

from __future__ import annotations

from controlplane import auditevents, evidence, inventory
from controlplane.drift import DriftReport, find_drift
from controlplane.errors import OperationalError
from controlplane.home import Home
from controlplane.promotion import gather, recorded_state


def check(home: Home, target: str) -> DriftReport:
    """Raises ``UsageError('invalid-vm-name' | 'unknown-target')`` (exit 64, like promote) before
    anything else, so no unvalidated name reaches a message or hint, and
    ``OperationalError('nothing-applied')`` when no apply was ever recorded for target."""
    from controlplane.transport import connect

    entry = inventory.load(home, target)
    recorded = recorded_state(home, target)
    if recorded is None:
        raise OperationalError(
            "nothing-applied",
            f"no successful apply is recorded for {target}; there is nothing to compare with",
            hint=f"promote first: avm promote --repo PATH --commit SHA --target {target} --apply",
        )
    receipt_id, expected = recorded
    with evidence.record_step(home, "status", inputs={"target": target, "against": receipt_id}) as step:
        step.subject("apply-receipt", _receipt_digest(home, receipt_id))
        host = connect(entry)
        try:
            facts = gather(host, [p.name for p in expected.profiles], list(expected.releases))
            # gateway audit events (tool denials, refusals) since that apply, into this receipt
            since = _receipt_started(home, receipt_id)
            for event in auditevents.gateway_events(host, [p.name for p in expected.profiles], since):
                step.event(event.pop("type"), **event)
        finally:
            host.close()
        report = find_drift(target, expected, facts, receipt_id)
        step.event(
            "alignment.check", in_sync=report.in_sync, findings=len(report.findings), against=receipt_id
        )
        step.result.update({"in_sync": report.in_sync, "findings": [f.model_dump() for f in report.findings]})
        step.non_claim("read-only: nothing was written to the host")
    return report


def _receipt_digest(home: Home, receipt_id: str) -> str:
    from controlplane import ledger
    from controlplane.receipt import digest_of

    return "sha256:" + digest_of(ledger.read(home.receipts, int(receipt_id)))


def _receipt_started(home: Home, receipt_id: str) -> str:
    from controlplane import ledger
    from controlplane.receipt import open_receipt

    return open_receipt(ledger.read(home.receipts, int(receipt_id)))[2].predicate.started
