"""``avm status``: the live host against what the last apply receipt says it left. Read-only.

One round trip gathers every fact; ``drift.find_drift`` compares them with the recorded state.
A second runs the sandbox probe (``controlplane.promote.enforcement``): egress not observed denied is
drift, and so are limits the apply saw enforced and that are not now; limits a backend never
enforced are reported as ``not-enforced`` in ``controls``. With an egress gateway, the receipt's
``result.usage`` is each profile's use of it since that apply (``controlplane.promote.usage``).
Exit 0 in sync, 2 drift, 1 error.
It never writes to the host (the probe's listener and child end with it); it records a
``status`` receipt.
"""

from __future__ import annotations

from typing import Any

from controlplane.errors import OperationalError
from controlplane.evidence import reader as auditlog
from controlplane.evidence import step as evidence
from controlplane.evidence.receipt import Statement
from controlplane.home import Home
from controlplane.promote import drift, enforcement, gatewaycheck
from controlplane.promote import events as auditevents
from controlplane.promote.drift import DriftReport, find_drift
from controlplane.promote.facts import gather
from controlplane.promote.plan import DesiredState
from controlplane.transport import inventory


def check(home: Home, target: str) -> DriftReport:
    """Compare the live host with the last good apply, or, when no apply ever succeeded, with
    the rollback target recorded before the last apply touched the host.

    Raises ``UsageError('invalid-vm-name' | 'unknown-target')`` (exit 64, like promote) before
    anything else, so no unvalidated name reaches a message or hint, and
    ``OperationalError('nothing-applied')`` when nothing was ever applied or attempted on target."""
    from controlplane.transport import connect

    entry = inventory.load(home, target)
    baseline = _baseline(home, target)
    if baseline is None:
        raise OperationalError(
            "nothing-applied",
            f"no apply is recorded for {target}; there is nothing to compare with",
            hint=f"promote first: avm promote --repo PATH --commit SHA --target {target} --apply",
        )
    receipt_id, expected, notes = baseline
    kind = "apply" if isinstance(expected, DesiredState) else "rollback-target"
    with evidence.record_step(home, "status", inputs={"target": target, "against": receipt_id}) as step:
        step.subject(f"{kind}-receipt", _receipt_digest(home, receipt_id))
        if isinstance(expected, DesiredState):
            names, releases = [p.name for p in expected.profiles], list(expected.releases)
        else:
            names = sorted(expected)
            releases = sorted({link.rstrip("/").rsplit("/", 1)[-1] for link in expected.values() if link})
        # controls observed in force from each sandbox, not read from configuration (profiles
        # that should not run have no sandbox to probe); the probe runs in the gather's round trip
        running = names if isinstance(expected, DesiredState) else [n for n in names if expected[n]]
        with connect(entry) as host:
            facts = gather(host, names, releases, then=enforcement.probe_argv(running) if running else None)
            observed = enforcement.from_gather(facts.then)
            # gateway audit events (tool denials, refusals) since that receipt, into this one
            since = _receipt_started(home, receipt_id)
            for event in auditevents.gateway_events(host, names, since):
                step.event(event.pop("type"), **event)
            recorded_gw = _recorded_gateway(home, receipt_id) if kind == "apply" else None
            gw_findings = (
                gatewaycheck.drift_findings(home, target, host, recorded_gw)
                if recorded_gw is not None
                else []
            )
            # the egress gateway's audit events since that receipt (its access log, read as root)
            for event in gatewaycheck.audit_events(host, since) if recorded_gw is not None else []:
                step.event(event.pop("type"), **event)
            if recorded_gw is not None:  # what each profile used through the gateway since then
                from controlplane.boundary.usage import since_stamp
                from controlplane.promote import usage

                step.result["usage"] = usage.read(host, since_stamp(since))
        if isinstance(expected, DesiredState):
            report = find_drift(target, expected, facts, receipt_id, notes=notes)
        else:
            report = drift.against_previous(target, expected, facts, receipt_id, notes=notes)
        enforcement.record(step, observed)
        extra = enforcement.findings(observed, _recorded_controls(home, receipt_id))
        rule_findings, rules = enforcement.host_side_findings(entry, running)
        if rules:
            step.observe("host_side_egress_rules", rules)
        report = report.model_copy(
            update={
                "findings": (*report.findings, *extra, *rule_findings, *gw_findings),
                "controls": {name: obs.summary() for name, obs in observed.items()},
            }
        )
        step.result["controls"] = report.controls
        step.event(
            "alignment.check", in_sync=report.in_sync, findings=len(report.findings), against=receipt_id
        )
        step.result.update(
            {
                "in_sync": report.in_sync,
                "baseline": report.baseline,
                "notes": list(notes),
                "findings": [f.model_dump() for f in report.findings],
            }
        )
        step.non_claim("read-only: nothing was written to the host")
    return report


def _baseline(
    home: Home, target: str
) -> tuple[str, DesiredState | dict[str, str | None], tuple[str, ...]] | None:
    """(receipt id, expected, notes) to compare with: the state the last good apply left, or
    the links recorded before the last (failed) apply when none ever succeeded."""
    failed: tuple[int, Statement] | None = None  # the newest apply that ended failed
    before_failed: tuple[int, dict[str, str | None]] | None = None  # its rollback target
    for seq, statement in auditlog.statements(home.receipts, newest_first=True):
        pred = statement.predicate
        if pred.inputs.get("target") != target:
            continue
        if pred.kind == "apply" and pred.status == "ok":
            notes: tuple[str, ...] = ()
            if failed is not None:
                notes = (
                    f"the last apply (#{failed[0]}) {_ended(failed[1])}; "
                    f"compared with the last good apply #{seq}",
                )
            return str(seq), DesiredState.model_validate(pred.result["host_state"]), notes
        if pred.kind == "apply" and pred.status == "failed" and failed is None:
            failed = (seq, statement)  # a refused apply changed nothing: it is not a failure here
        elif pred.kind == "rollback-target" and pred.status == "ok" and failed and before_failed is None:
            before_failed = (seq, pred.result.get("previous", {}))
    if failed is not None and before_failed is not None:
        note = (
            f"no apply to {target} ever succeeded; the last one (#{failed[0]}) {_ended(failed[1])}; "
            f"compared with the state recorded before it (#{before_failed[0]})"
        )
        return str(before_failed[0]), before_failed[1], (note,)
    return None


def _ended(statement: Statement) -> str:
    error = statement.predicate.error or {}
    return f"ended {statement.predicate.status} ({error.get('code', 'no error code')})"


def _receipt_digest(home: Home, receipt_id: str) -> str:
    from controlplane.evidence import ledger
    from controlplane.evidence.receipt import digest_of

    return "sha256:" + digest_of(ledger.read(home.receipts, int(receipt_id)))


def _receipt_started(home: Home, receipt_id: str) -> str:
    from controlplane.evidence import ledger
    from controlplane.evidence.receipt import open_receipt

    return open_receipt(ledger.read(home.receipts, int(receipt_id)))[2].predicate.started


def _recorded_controls(home: Home, receipt_id: str) -> dict[str, Any]:
    """What the apply observed in force per profile (empty for an apply before there was a probe)."""
    from controlplane.evidence import ledger
    from controlplane.evidence.receipt import open_receipt

    result = open_receipt(ledger.read(home.receipts, int(receipt_id)))[2].predicate.result
    controls = result.get("controls", {})
    return controls if isinstance(controls, dict) else {}


def _recorded_gateway(home: Home, receipt_id: str) -> dict[str, Any] | None:
    """The egress gateway the apply installed and saw in force (None: it installed none)."""
    from controlplane.evidence import ledger
    from controlplane.evidence.receipt import open_receipt

    observed = open_receipt(ledger.read(home.receipts, int(receipt_id)))[2].predicate.observations
    found = observed.get("gateway")
    return found if isinstance(found, dict) else None
