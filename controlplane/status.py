"""``avm status``: the live host against what the last apply receipt says it left. Read-only.

One round trip gathers every fact; ``drift.find_drift`` compares them with the recorded state.
A second runs the sandbox probe (``controlplane.enforcement``): egress not observed denied is
drift, and so are limits the apply saw enforced and that are not now; limits a backend never
enforced are reported as ``not-enforced`` in ``controls``. Exit 0 in sync, 2 drift, 1 error.
It never writes to the host (the probe's listener and child end with it); it records a
``status`` receipt.
"""

from __future__ import annotations

from typing import Any

from controlplane import auditevents, enforcement, evidence, inventory
from controlplane.drift import DriftReport, find_drift
from controlplane.errors import OperationalError
from controlplane.home import Home
from controlplane.promotion import gather, recorded_state


def check(home: Home, target: str) -> DriftReport:
    """Raises ``OperationalError('nothing-applied')`` when no apply was ever recorded for target."""
    from controlplane.transport import connect

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
        host = connect(inventory.load(home, target))
        names = [p.name for p in expected.profiles]
        try:
            facts = gather(host, names, list(expected.releases))
            # controls observed in force from each sandbox, not read from configuration
            observed = enforcement.probe(host, names)
            # gateway audit events (tool denials, refusals) since that apply, into this receipt
            since = _receipt_started(home, receipt_id)
            for event in auditevents.gateway_events(host, [p.name for p in expected.profiles], since):
                step.event(event.pop("type"), **event)
        finally:
            host.close()
        report = find_drift(target, expected, facts, receipt_id)
        enforcement.record(step, observed)
        extra = enforcement.findings(observed, _recorded_controls(home, receipt_id))
        rule_findings, rules = enforcement.host_side_findings(inventory.load(home, target), names)
        if rules:
            step.observe("host_side_egress_rules", rules)
        report = report.model_copy(
            update={
                "findings": (*report.findings, *extra, *rule_findings),
                "controls": {name: obs.summary() for name, obs in observed.items()},
            }
        )
        step.result["controls"] = report.controls
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


def _recorded_controls(home: Home, receipt_id: str) -> dict[str, Any]:
    """What the apply observed in force per profile (empty for an apply before there was a probe)."""
    from controlplane import ledger
    from controlplane.receipt import open_receipt

    result = open_receipt(ledger.read(home.receipts, int(receipt_id)))[2].predicate.result
    controls = result.get("controls", {})
    return controls if isinstance(controls, dict) else {}
