"""Agents' permission requests on a Tier-1 host: collected, decided by humans, applied.

- ``collect`` (``avm egress requests``): reads what the recorder stored on the host (as root,
  read-only), judges every record (``boundary.requests.judge``: a forged or malformed one is
  listed as invalid, never trusted), computes for each valid one the profile's policy with the
  request granted and the digest an approval must sign (``requests.change_digest``), and
  records it all in an ``egress-requests`` receipt. The base is the policy the last apply
  recorded (``gateway_policies``), so what a human approves is exactly one generation change.
- ``approval_digest`` (``avm approve --request``): the digest of a collected request, which
  ``governance.approvals.sign`` signs like a plan digest: the same rules (distinct trusted
  approver keys, never the promoter's, enough for the tier, at least one, expiry).
- ``deny`` (``avm egress deny``): an ``egress-request-denied`` receipt; a denied request is
  never applied.
- ``apply`` (``avm egress apply --target VM`` without a commit): the approved requests whose
  base is still the policy in force, rendered, approvals counted (``approvals.require``: exit 3
  with the host untouched), then ``egressapply.apply_gateway`` (hot reload, no agent restart,
  probes, a probe per granted rule). Approver keys never go to the host, and nothing on the host
  is read as an approval: an agent cannot approve itself.
"""

from __future__ import annotations

import json
from typing import Any

from controlplane import hostscripts
from controlplane._internal.progress import Progress, quiet
from controlplane.boundary import requests
from controlplane.boundary.policy import EgressPolicy, NameRule
from controlplane.canonical import canonical_bytes, domain_digest
from controlplane.errors import OperationalError, RefusedError, UsageError
from controlplane.evidence import reader as auditlog
from controlplane.evidence import step as evidence
from controlplane.governance import approvals, gate
from controlplane.home import Home
from controlplane.promote import state as promotestate

COLLECTED, DENIED = "egress-requests", "egress-request-denied"


def recorded_policies(home: Home, target: str) -> tuple[tuple[str, Any], dict[str, dict[str, Any]]]:
    """The last apply on ``target`` and the policies it recorded (``gateway_policies``).
    Raises ``nothing-applied`` / ``egress-policies-unrecorded`` (exit 1)."""
    from controlplane.evidence import ledger
    from controlplane.evidence.receipt import open_receipt

    prior = promotestate.recorded_state(home, target)
    if prior is None:
        raise OperationalError(
            "nothing-applied",
            f"no apply is recorded for {target}; the gateway is installed by a promotion",
            hint=f"promote first: avm promote --repo PATH --commit SHA --target {target} --apply",
        )
    observed = open_receipt(ledger.read(home.receipts, int(prior[0])))[2].predicate.observations
    found = observed.get("gateway_policies")
    if not isinstance(found, dict) or not found:
        raise OperationalError(
            "egress-policies-unrecorded",
            f"apply receipt #{prior[0]} records no gateway policies for {target}",
            hint="an apply made before permission requests existed: run "
            "`avm egress apply --repo ... --commit ... --apply` once",
        )
    return prior, found


def _decisions(home: Home, target: str) -> tuple[set[str], set[str]]:
    """Request ids denied and applied on ``target``, from the ledger."""
    denied: set[str] = set()
    applied: set[str] = set()
    for _, statement in auditlog.statements(home.receipts):
        pred = statement.predicate
        if pred.status != "ok" or pred.inputs.get("target") != target:
            continue
        if pred.kind == DENIED:
            denied.add(str(pred.inputs.get("request")))
        elif pred.kind == "apply":
            applied.update(str(x) for x in pred.result.get("requests_applied", []))
    return denied, applied


def needed_approvers(tier: str | None) -> int:
    """A permission request always needs a human: the tier's approver count, at least one."""
    need, _ = gate.approvers_needed({"p": tier}) if tier else (0, [])
    return max(1, need)


def _entry(
    home: Home,
    target: str,
    judged: requests.Judged,
    base: dict[str, dict[str, Any]],
    decided: tuple[set[str], set[str]],
) -> dict[str, Any]:
    out: dict[str, Any] = judged.model_dump(mode="json", exclude={"rule"})
    denied, applied = decided
    if judged.rule is None or judged.profile is None:
        return out
    rule: NameRule = judged.rule
    out["rule"] = rule.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
        "host": rule.host,
        "port": rule.port,
    }
    record = base[judged.profile]
    before = EgressPolicy.model_validate({"names": record["names"]})
    after = requests.grant(before, rule)
    digest = requests.change_digest(target, judged.id, judged.profile, before.generation, after.generation)
    out.update({"from": before.generation, "to": after.generation, "change_digest": digest})
    out["approvers_needed"] = needed_approvers(record.get("tier"))
    if judged.id in applied:
        out["state"] = "applied"
    elif judged.id in denied:
        out["state"] = "denied"
    elif before.generation == after.generation:
        out.update({"state": "invalid", "error": "already allowed by the policy in force"})
    else:
        valid, rejected, _ = approvals.find(home, digest)
        out["approvals"] = {"valid": [a.approver for a in valid], "rejected": rejected}
        if len(valid) >= out["approvers_needed"]:
            out["state"] = "approved"
    return out


def collect(home: Home, target: str) -> dict[str, Any]:
    """Read, judge and record the requests stored on ``target`` (an ``egress-requests`` receipt)."""
    from controlplane.promote.status import _receipt_digest
    from controlplane.transport import connect, inventory

    prior, base = recorded_policies(home, target)
    entry = inventory.load(home, target)
    with evidence.record_step(home, COLLECTED, inputs={"target": target, "against": prior[0]}) as step:
        with connect(entry) as host:
            argv = ["python3", "-c", hostscripts.text("request_recorder"), "list"]
            listed = host.run(argv, timeout=60).check(hint="reading the stored requests failed on the host")
        try:
            records = json.loads(listed.stdout)["records"]
        except (ValueError, KeyError, TypeError) as exc:
            raise OperationalError(
                "egress-requests-unreadable", f"the host's request listing: {exc}"
            ) from None
        decided = _decisions(home, target)
        out = []
        for rec in records:
            try:
                doc = json.loads(rec.get("text") or "")
            except ValueError:
                doc = {"id": str(rec.get("file", "")).removesuffix(".json")}
            judged = requests.judge(doc, owner=str(rec.get("owner")), profiles=frozenset(base))
            out.append(_entry(home, target, judged, base, decided))
        step.subject("apply-receipt", _receipt_digest(home, prior[0]))
        step.result["requests"] = out
        for e in out:
            step.event("permission.requested", request=e["id"], profile=e.get("profile"), state=e["state"])
    return {"target": target, "requests": out, "receipt": step.receipt_id}


def find_collected(home: Home, request_id: str) -> tuple[str, dict[str, Any]]:
    """(target, entry) of the newest collection of ``request_id``. Raises ``request-unknown``."""
    if not requests.is_request_id(request_id):
        raise requests.request_id_error(request_id)
    for _, statement in auditlog.statements(home.receipts, newest_first=True):
        pred = statement.predicate
        if pred.kind == COLLECTED and pred.status == "ok":
            for e in pred.result.get("requests", []):
                if e.get("id") == request_id:
                    return str(pred.inputs["target"]), dict(e)
    raise UsageError(
        "request-unknown",
        f"no collected request {request_id}",
        hint="collect first: avm egress requests --target VM",
        details={"expected": "a request id listed by avm egress requests", "actual": request_id},
    )


def _decidable(home: Home, target: str, request_id: str, entry: dict[str, Any], verb: str) -> None:
    """Refuse unless the request is pending or approved: as collected, and as the ledger says
    now (a denial or an apply since the collection counts)."""
    denied, applied = _decisions(home, target)
    if request_id in denied or request_id in applied:
        entry = {**entry, "state": "denied" if request_id in denied else "applied", "error": None}
    if entry["state"] not in ("pending", "approved"):
        raise RefusedError(
            "request-not-pending",
            f"request {request_id} is {entry['state']}{': ' + entry['error'] if entry.get('error') else ''}; "
            f"it cannot be {verb}",
            hint="`avm egress requests --target VM` shows each request's state",
            details={"expected": "pending", "actual": entry["state"]},
        )


def approval_digest(home: Home, request_id: str) -> tuple[str, dict[str, Any]]:
    """The change digest an approval of ``request_id`` signs, and what it is (for the approver)."""
    target, entry = find_collected(home, request_id)
    _decidable(home, target, request_id, entry, "approved")
    return str(entry["change_digest"]), {**entry, "target": target}


def deny(home: Home, request_id: str, why: str) -> dict[str, Any]:
    target, entry = find_collected(home, request_id)
    _decidable(home, target, request_id, entry, "denied")
    inputs = {"target": target, "request": request_id, "reason": why}
    with evidence.record_step(home, DENIED, inputs=inputs) as step:
        step.subject(f"egress-request:{request_id}", str(entry["change_digest"]))
        step.result.update({"request": request_id, "profile": entry.get("profile"), "reason": why})
        step.event("permission.denied", request=request_id, profile=entry.get("profile"), reason=why)
    return {"target": target, "request": request_id, "state": "denied", "receipt": step.receipt_id}


def _probe_for(rule: NameRule) -> dict[str, Any]:
    path = rule.paths[0]
    path = path.removesuffix("*") + "avm-probe" if path.endswith("/*") else path
    method = "GET" if "GET" in rule.methods else rule.methods[0]
    return {"host": rule.host, "port": rule.port, "method": method, "path": path}


def apply(home: Home, target: str, *, apply: bool = False, progress: Progress = quiet) -> dict[str, Any]:
    """Plan (and with ``apply`` hot-reload) the approved requests of ``target``."""
    from controlplane.promote import egressapply, gateway

    prior, base = recorded_policies(home, target)
    inputs = {"operation": "egress-apply-requests", "target": target}
    collected = collect(home, target)["requests"]
    with evidence.record_step(home, "plan", inputs={**inputs, "apply": apply}) as step:
        policies = {p: EgressPolicy.model_validate({"names": r["names"]}) for p, r in base.items()}
        chosen = []
        for e in collected:
            if e["state"] != "approved" or e["from"] != policies[e["profile"]].generation:
                continue  # one change per profile per apply: a later one is re-based by the next collection
            policies[e["profile"]] = requests.grant(
                policies[e["profile"]], NameRule.model_validate(e["rule"])
            )
            chosen.append(e)
        waiting = [e for e in collected if e["state"] == "pending"]
        if not chosen:
            if waiting:
                e = waiting[0]
                approvals.require(
                    home, e["change_digest"], e["approvers_needed"], why=f"permission request {e['id']}"
                )
            raise UsageError(
                "egress-no-approved-requests",
                f"no approved permission request to apply on {target}",
                hint=f"list them: avm egress requests --target {target}; approve: avm approve --request ID",
                details={
                    "expected": "an approved request",
                    "actual": [(e["id"], e["state"]) for e in collected],
                },
            )
        progress(f"applying {len(chosen)} approved request(s)")
        gw = gateway.prepare_policies(
            home,
            target,
            policies,
            ip_rules={
                p: [(str(h), int(n), str(t)) for h, n, t in r.get("ip_rules", [])] for p, r in base.items()
            },
            tiers={p: r["tier"] for p, r in base.items() if r.get("tier")},
        )
        assert gw is not None  # the recorded policies list names (a request only adds some)
        accepted = []
        for e in chosen:
            ok = gw.policies[e["profile"]].generation == e["to"]
            step.check(f"request-change:{e['id']}", ok=ok, detail=f"{e['profile']}: {e['from']} -> {e['to']}")
            if not ok:  # never apply a policy other than the one the approvals signed
                raise RefusedError(
                    "egress-request-changed",
                    f"request {e['id']}: the rendered policy of {e['profile']} is "
                    f"{gw.policies[e['profile']].generation}, the approved change is to {e['to']}",
                    hint=f"collect again (avm egress requests --target {target}) and approve the new change",
                    details={"expected": e["to"], "actual": gw.policies[e["profile"]].generation},
                )
            found = approvals.require(
                home, e["change_digest"], e["approvers_needed"], why=f"request {e['id']}"
            )
            accepted += [{"request": e["id"], "approver": a.approver, "receipt": a.receipt} for a in found]
            step.event(
                "gate.decision", gate="approval", outcome="pass", plan=e["change_digest"], request=e["id"]
            )
        doc = {"target": target, "requests": [e["change_digest"] for e in chosen], "gateway": gw.describe()}
        digest = domain_digest("egress-plan", canonical_bytes(doc))
        step.subject("plan", digest)
        step.observe("gateway", gw.describe())
        step.result.update({"plan_digest": digest, "actions": [], "requests": [e["id"] for e in chosen]})
        if not apply:
            step.non_claim("dry-run: nothing was written to the host")
    out: dict[str, Any] = {"target": target, "plan_digest": digest, "requests": [e["id"] for e in chosen]}
    out.update({"to": gw.generation, "applied": False, "receipts": {"plan": step.receipt_id or ""}})
    if not apply:
        return out
    applied = egressapply.apply_gateway(
        home,
        target,
        gw,
        prior,
        inputs=inputs,
        plan_digest=digest,
        approved=accepted,
        subject=("plan", digest),
        lock_why=f"avm egress apply {len(chosen)} request(s)",
        result={"requests_applied": [e["id"] for e in chosen]},
        granted={
            p: [_probe_for(NameRule.model_validate(e["rule"])) for e in chosen if e["profile"] == p]
            for p in {e["profile"] for e in chosen}
        },
    )
    out["receipts"]["apply"] = applied["receipt"]
    out.update({"applied": True, "reload_s": applied["reload_s"], "main_pids": applied["main_pids"]})
    return out
