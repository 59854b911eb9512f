"""``avm egress apply``: a host's gateway policy from a signed commit, hot-reloaded, no agent restart.

The commit is verified like a promotion (signature, pinned digests, tier controls; exit 3 with
the host untouched), the gateway rendered from its ``avm.yaml`` (``promote.gateway.prepare``),
and the plan digest covers the rendering (``plan`` receipt; dry-run by default). ``--apply``
(an ``apply`` receipt, under the host lock): the gateway's new files go in beside the old,
then the stages of ``boundary.gateway.stages`` (the same order as a Tier-2 reload: a staged
CDS of old and new clusters, the LDS, the final CDS) are each renamed into place, and Envoy's
admin socket is read until it reports each one in force. If Envoy rejects
one, the last good LDS and CDS are put back and the receipt says which generation stays in
force (``gateway-reload-rejected``, exit 1). Agent units are never restarted: their MainPIDs
before and after are a check. Then the boundary table and the sandbox probes, as after a
promotion. The receipt's ``host_state`` is the last apply's (no agent changed), so ``avm
status`` compares the host with this gateway from now on.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from controlplane._internal.progress import Progress, quiet
from controlplane.boundary import tier1
from controlplane.boundary.gateway import Stage, reload_rejected, stages
from controlplane.boundary.render import dump as dump_xds
from controlplane.canonical import canonical_bytes, domain_digest
from controlplane.errors import OperationalError, UsageError
from controlplane.evidence import step as evidence
from controlplane.governance import gate as governance_gate
from controlplane.governance import secrets as secret_store
from controlplane.home import Home
from controlplane.promote import enforcement, gateway, gatewaycheck, hostlock
from controlplane.promote import state as promotestate
from controlplane.promote.layout import LAYOUT
from controlplane.transport import inventory
from controlplane.transport.base import Transport


def _main_pids(host: Transport, profiles: list[str]) -> dict[str, str]:
    units = {LAYOUT.unit_name(p): p for p in profiles}
    out = host.run(["systemctl", "show", "-p", "Id,MainPID", *units], timeout=30).stdout
    found: dict[str, str] = {}
    for block in out.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if props.get("Id") in units:
            found[units[props["Id"]]] = props.get("MainPID", "")
    return found


def _step(
    host: Transport, name: str, data: bytes, done: Any, rejected: int, timeout: float = 10.0
) -> dict[str, Any]:
    """Rename ``name`` into place; wait until ``done(in_force)`` or a rejection is counted."""
    gateway.put_file(host, str(tier1.ETC / name), data, 0o640, tier1.USER)
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = gatewaycheck.read_in_force(host)
        if done(seen) or int(seen.get("rejected", 0)) > rejected:
            return seen
        time.sleep(0.05)
    return seen


def hot_reload(host: Transport, gw: tier1.Tier1Gateway, blobs: list[gateway.Blob]) -> dict[str, Any]:
    """Write ``blobs`` (leaves, secrets, SDS; not LDS/CDS), then staged CDS -> LDS -> CDS.
    Returns what is in force. Raises ``gateway-reload-rejected`` with the old files restored."""
    for path, data, mode, group in blobs:
        gateway.put_file(host, path, data, mode, group)
    before = gatewaycheck.read_in_force(host)
    if "error" in before:
        raise OperationalError("gateway-admin-unreachable", f"the egress gateway's admin: {before['error']}")
    was, was_cds, rejected = str(before.get("lds")), str(before.get("cds")), int(before.get("rejected", 0))
    old_lds, old_cds = host.get(str(tier1.ETC / "lds.json")), host.get(str(tier1.ETC / "cds.json"))
    new = gw.rendered
    clusters = (json.loads(old_cds) if old_cds.strip() else {}).get("resources", [])
    start = time.monotonic()
    seen = before
    for stage in stages(clusters, was_cds, new):

        def done(f: dict[str, Any], s: Stage = stage) -> bool:
            return f.get(s.kind) == s.version

        seen = _step(host, stage.file, dump_xds(stage.doc), done, rejected)
        if not done(seen):
            _step(host, "lds.json", old_lds, lambda f: f.get("lds") == was, rejected + 99)
            _step(host, "cds.json", old_cds, lambda f: f.get("cds") == was_cds, rejected + 99)
            why = (
                "Envoy rejected " + stage.file
                if int(seen.get("rejected", 0)) > rejected
                else f"{stage.file} not in force"
            )
            raise reload_rejected(was, new.generation, why)
    return {**seen, "seconds": round(time.monotonic() - start, 4)}


def run(
    home: Home, *, repo: Path, ref: str, target: str, apply: bool = False, progress: Progress = quiet
) -> dict[str, Any]:
    """Plan (and with ``apply`` hot-reload) the gateway of ``ref``'s avm.yaml on ``target``."""
    from controlplane.promote import pipeline

    inputs = {"operation": "egress-apply", "repo": str(repo), "ref": ref, "target": target}
    prior = promotestate.recorded_state(home, target)
    if prior is None:
        raise OperationalError(
            "nothing-applied",
            f"no apply is recorded for {target}; the gateway is installed by a promotion",
            hint=f"promote first: avm promote --repo PATH --commit SHA --target {target} --apply",
        )
    from controlplane.promote.status import _recorded_gateway

    recorded = _recorded_gateway(home, prior[0]) or {}
    with evidence.record_step(home, "plan", inputs={**inputs, "apply": apply}) as step:
        verified = pipeline.verify_release(home, repo, ref, step, progress)
        tiers = governance_gate.check_tiers(home, verified.manifest, [], target, step)
        gw = gateway.prepare(home, target, verified.manifest.profiles)
        if gw is None:
            raise UsageError(
                "egress-nothing-to-apply",
                f"no profile of {ref} lists an egress entry by name: there is no gateway to apply",
                hint="list names under a profile's egress:, or promote to remove the gateway",
            )
        doc = {"target": target, "from": recorded.get("generation"), "gateway": gw.describe()}
        digest = domain_digest("egress-plan", canonical_bytes(doc))
        step.subject("plan", digest)
        step.observe("gateway", gw.describe())
        step.result.update({"plan_digest": digest, "actions": [], "from": recorded.get("generation")})
        step.result["to"] = gw.generation
        approved = governance_gate.check_approvals(home, tiers, digest, step, apply=apply)
        if not apply:
            step.non_claim("dry-run: nothing was written to the host")
    out: dict[str, Any] = {
        "target": target,
        "commit": verified.sha,
        "plan_digest": digest,
        "from": recorded.get("generation"),
    }
    out.update({"to": gw.generation, "applied": False, "receipts": {"plan": step.receipt_id or ""}})
    if not apply or gw.generation == recorded.get("generation"):
        return out
    applied = apply_gateway(
        home,
        target,
        gw,
        prior,
        inputs=inputs,
        plan_digest=digest,
        approved=approved,
        subject=(f"commit:{verified.sha}", f"sha1:{verified.sha}"),
        lock_why=f"avm egress apply {verified.sha[:12]}",
    )
    out["receipts"]["apply"] = applied["receipt"]
    out.update({"applied": True, "reload_s": applied["reload_s"], "main_pids": applied["main_pids"]})
    return out


def apply_gateway(
    home: Home,
    target: str,
    gw: tier1.Tier1Gateway,
    prior: tuple[str, Any],
    *,
    inputs: dict[str, Any],
    plan_digest: str,
    approved: list[dict[str, Any]],
    subject: tuple[str, str],
    lock_why: str,
    result: dict[str, Any] | None = None,
    granted: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The ``apply`` step of an egress change (a commit's policy or approved requests): under
    the host lock, hot reload, hosts files, boundary table, agents not restarted, probes
    (``granted``: profile -> the rules a request added, each probed as that profile).
    ``result`` goes into the receipt. Raises ``egress-probe-failed`` after the receipt."""
    from controlplane.transport import connect

    values = {ref_: secret_store.resolve(home, ref_) for ref_ in gw.refs}
    the_target = inventory.load(home, target)
    profiles = [p.name for p in prior[1].profiles]
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(connect(the_target))
        lock = stack.enter_context(hostlock.hold(host, lock_why))
        with evidence.record_step(home, "apply", inputs=inputs) as step:
            step.subject(*subject)
            step.subject("plan", plan_digest)
            step.observe("lock", lock)
            step.result["approvals"] = approved
            step.result.update(result or {})
            step.non_claim("secret values were written to the gateway's root-only files and are not recorded")
            before = _main_pids(host, profiles)
            from controlplane.promote import classifier

            classifier.ensure(host, gw, step)  # a name that now inspects needs it before the reload
            try:
                in_force = hot_reload(host, gw, gateway.blobs(home, target, gw, values, lds_cds=False))
            except OperationalError as exc:
                if exc.code == "gateway-reload-rejected":
                    kept = gatewaycheck.read_in_force(host)
                    step.observe("gateway_in_force_after", kept)
                    step.check(
                        "gateway-reload",
                        ok=False,
                        detail=f"rejected ({exc.message}); generation {kept.get('lds')} stays in force",
                    )
                raise
            step.check(
                "gateway-reload", ok=True, detail=f"{gw.generation} in force in {in_force['seconds']} s"
            )
            for p in gw.addresses:  # the hosts files in place: the units' bind mounts see them
                host.run(["tee", str(tier1.hosts_file(p))], stdin=_hosts(gw, p), timeout=30).check()
            names = sorted(set(profiles) | set(gw.ip_rules))
            found = enforcement.host_uids(host, [LAYOUT.user(p) for p in names])
            uids = {p: found[LAYOUT.user(p)] for p in names if LAYOUT.user(p) in found}
            gateway.load_table(the_target, host, tier1.nft_script(gw, uids, gw.ip_rules), step)
            after = _main_pids(host, profiles)
            step.check(
                "agents-not-restarted",
                ok=before == after and all(v not in ("", "0") for v in after.values()),
                detail=f"MainPID before {before}, after {after}",
            )
            step.observe("gateway", {**gw.describe(), "in_force": in_force, "restarted": False})
            step.observe("gateway_policies", gw.policy_record())
            failed = gatewaycheck.probe(host, gw, profiles, step, granted=granted)
            step.result.update(
                {"host_state": prior[1].model_dump(mode="json"), "reload_s": in_force["seconds"]}
            )
    if failed:
        raise OperationalError(
            "egress-probe-failed",
            f"the egress boundary was not observed in force: {', '.join(failed)}",
            hint=f"`avm receipts show {step.receipt_id}` has each probe's outcome",
            details={"failed": failed},
        )
    return {"receipt": step.receipt_id or "", "reload_s": in_force["seconds"], "main_pids": after}


def _hosts(gw: tier1.Tier1Gateway, profile: str) -> bytes:
    return next(f.data for f in gw.files if f.path == str(tier1.hosts_file(profile)))
