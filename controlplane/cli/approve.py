"""avm approve: sign an approval bound to exactly one plan digest, with the approver's own key."""

from __future__ import annotations

from pathlib import Path

import click

from controlplane.cli.app import AppContext, pass_app
from controlplane.errors import UsageError


@click.command("approve")
@click.option("--plan", "plan_digest", help="The plan digest shown by the dry-run (sha256:...).")
@click.option(
    "--request",
    "request_id",
    help="A permission request (rq-...) from `avm egress requests`, instead of --plan.",
)
@click.option(
    "--key",
    "key_path",
    required=True,
    envvar="AVM_APPROVER_KEY",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The approver's own ed25519 key (avm keys approver-init; $AVM_APPROVER_KEY); never the promoter's.",
)
@click.option(
    "--expires", default="24h", show_default=True, help="How long the approval holds: 30m, 24h, 7d."
)
@pass_app
def approve(
    app: AppContext, plan_digest: str | None, request_id: str | None, key_path: Path, expires: str
) -> None:
    """Approve exactly one plan digest (governance gate for tiers that require approval).

    \b
    Run the dry-run (`avm promote ...` without --apply), read its plan and plan digest, then
    sign that digest. `promote --apply` counts distinct trusted approvers (avm keys
    approver-trust) whose unexpired approval names exactly the plan it is about to execute;
    if the plan changes, its digest changes and the approval no longer applies. The approval is
    recorded as a receipt of kind `approval` carrying the approver-signed envelope.

    \b
    --request ID signs the change a collected permission request makes (its change digest:
    the target, the request, the profile's policy generation before and after), with the same
    rules; `avm egress apply --target VM --apply` then applies it.
    """
    from controlplane.evidence import step as evidence
    from controlplane.governance import approvals

    if (plan_digest is None) == (request_id is None):
        raise UsageError("approve-how", "give exactly one of --plan DIGEST and --request ID")
    inputs = {"expires": expires}
    if request_id is not None:
        from controlplane.promote import egressrequests

        plan_digest, change = egressrequests.approval_digest(app.home, request_id)
        inputs.update({"request": request_id, "target": change["target"]})
        app.say(f"request {request_id} ({change['profile']}): {change['from']} -> {change['to']}")
    assert plan_digest is not None
    ttl = approvals.parse_ttl(expires)
    with evidence.record_step(app.home, "approval", inputs={"plan_digest": plan_digest, **inputs}) as step:
        keyid, envelope = approvals.sign(key_path, plan_digest, ttl)
        step.subject("plan", plan_digest)
        step.subject("approver-key", keyid)
        step.result["approval"] = envelope
        step.event("approval.signed", approver=keyid, plan=plan_digest, ttl_s=ttl)
        step.non_claim(
            "whether the approver reviewed the plan's content is not something a signature can show"
        )
    app.emit(
        {"plan_digest": plan_digest, "approver": keyid, "ttl_s": ttl, "receipt": step.receipt_id},
        f"approved {plan_digest}\napprover {keyid}, valid for {expires}\n"
        f"receipt #{step.receipt_id} (approval)",
    )


commands = [approve]
