"""The Tier-1 gateway observed, never assumed: what Envoy's admin reports in force, the probes
from each profile's sandbox (``hostscripts/gateway_probe.py``), drift against what an apply
recorded, and the audit events of its access log. Read-only on the host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from controlplane import hostscripts
from controlplane.boundary import tier1
from controlplane.promote.gateway import _changed, ca_for, target_dir
from controlplane.promote.layout import LAYOUT

if TYPE_CHECKING:
    from controlplane.evidence.step import Step
    from controlplane.home import Home
    from controlplane.promote.drift import Finding
    from controlplane.transport.base import Transport

PROBE_TIMEOUT_S = 3.0
_DENIED = ("errno 1", "errno 13", "errno 113", "timeout")  # EPERM: dropped by netfilter


def _run_probe(host: Transport, request: dict[str, Any]) -> dict[str, Any]:
    argv = ["python3", "-c", hostscripts.text("gateway_probe"), json.dumps(request, sort_keys=True)]
    result = host.run(argv, timeout=120).check(hint="the gateway probe failed on the host")
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def read_in_force(host: Transport) -> dict[str, Any]:
    """What Envoy's admin reports now (``{"error": ...}`` when it does not answer)."""
    admin: dict[str, Any] = _run_probe(host, {"admin": str(tier1.ADMIN_SOCKET), "profiles": {}})["admin"]
    return admin


def wait_in_force(host: Transport, generation: str, cds_version: str, attempts: int = 40) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for _ in range(attempts):
        seen = read_in_force(host)
        if seen.get("lds") == generation and seen.get("cds") == cds_version:
            return seen
        time.sleep(0.25)
    return seen


def _listed(gw: tier1.Tier1Gateway, profile: str) -> dict[str, Any]:
    exact = [r for r in gw.policies[profile].names if not r.wildcard]
    rule = next((r for r in exact if r.mcp is None), exact[0])
    path = rule.paths[0]
    path = path.removesuffix("*") + "avm-probe" if path.endswith("/*") else path
    method = "GET" if "GET" in rule.methods else rule.methods[0]
    out: dict[str, Any] = {"host": rule.host, "port": rule.port, "method": method, "path": path}
    if rule.mcp is not None:  # an MCP server is probed with a ping (through the pinning service)
        out["rpc"] = {"jsonrpc": "2.0", "id": "avm-probe", "method": "ping"}
    return out


def probe(
    host: Transport,
    gw: tier1.Tier1Gateway,
    profiles: Sequence[str],
    step: Step,
    *,
    granted: Mapping[str, list[dict[str, Any]]] | None = None,
) -> list[str]:
    """The boundary probed from each profile's sandbox; a check per probe. Returns the failed ones.
    ``granted``: profile -> requests (host, port, method, path) an approved permission request
    allowed: each must pass the gateway (no denial) as that profile."""
    chosen = [p for p in profiles if p in gw.addresses]
    grants = dict(granted or {})
    wanted: dict[str, dict[str, Any]] = {
        p: {"user": LAYOUT.user(p), "listed": _listed(gw, p), "granted": grants.get(p, [])} for p in chosen
    }
    request = {
        "admin": str(tier1.ADMIN_SOCKET),
        "bundle": str(tier1.CA_BUNDLE),
        "timeout": PROBE_TIMEOUT_S,
        "profiles": wanted,
    }
    doc = _run_probe(host, request)
    step.observe("gateway_probe", doc)
    control = doc.get("control", {})
    failed: list[str] = []

    def check(name: str, ok: bool, detail: str) -> None:
        step.check(name, ok=ok, detail=detail)
        if not ok:
            failed.append(name)

    for p in chosen:
        got = doc["profiles"].get(p, {})
        if "error" in got:
            check(f"egress-probe:{p}", False, str(got["error"]))
            continue
        listed, wrong = got["listed"], got["wrong_path"]
        check(
            f"egress-listed:{p}",
            listed.get("resolved") == [gw.addresses[p]] and 200 <= int(listed.get("status") or 0) < 300,
            f"{wanted[p]['listed']['host']} resolved to {listed.get('resolved')} "
            f"(listener {gw.addresses[p]}), status {listed.get('status')} {listed.get('error', '')}".strip(),
        )
        check(
            f"egress-wrong-path:{p}",
            wrong.get("status") == 403 and wrong.get("denied_reason") == "path-not-allowed",
            f"status {wrong.get('status')}, reason {wrong.get('denied_reason')} {wrong.get('error', '')}",
        )
        seen = got.get("boundary") or {}
        rendered = gw.policies[p].generation
        check(
            f"boundary-policy:{p}",
            seen.get("status") == 200
            and (seen.get("policy"), seen.get("identity")) == (rendered, f"profile:{p}"),
            f"GET http://avm.boundary/policy: status {seen.get('status')}, identity {seen.get('identity')}, "
            f"policy {seen.get('policy')} (rendered {rendered}) {seen.get('error', '')}".strip(),
        )
        results = list(got.get("granted") or [])
        for i, want in enumerate(grants.get(p, [])):
            res = results[i] if i < len(results) else {"error": "not probed"}
            check(
                f"egress-granted:{p}:{i}",
                "error" not in res and res.get("denied_reason") is None and res.get("status") is not None,
                f"{want['method']} {want['host']}:{want['port']}{want['path']}: status {res.get('status')}, "
                f"denial {res.get('denied_reason')} {res.get('error', '')}".strip(),
            )
        unlisted = got.get("unlisted") or {}
        outside = str(control.get("name_resolved", "error"))
        check(
            f"egress-unlisted-name:{p}",
            bool(unlisted)
            and not outside.startswith("error")
            and str(unlisted.get("resolved")).startswith("error"),
            f"{control.get('name')}: {outside} outside the sandbox, {unlisted.get('resolved')} inside",
        )
        check(
            f"egress-direct-ip:{p}",
            control.get("direct") == "connected" and got.get("direct") in _DENIED,
            f"{control.get('address')}: {got.get('direct')} (outside the sandbox: {control.get('direct')})",
        )
        check(
            f"egress-dns:{p}",
            control.get("dns") == "received" and got.get("dns_received") == 0,
            f"UDP query to {control.get('address')}: {got.get('dns')}, received {got.get('dns_received')} "
            f"(outside the sandbox: {control.get('dns')})",
        )
        check(
            f"egress-metadata:{p}",
            got.get("metadata") in (*_DENIED, "errno 101"),
            f"169.254.169.254:80: {got.get('metadata')}",
        )
    return failed


def drift_findings(home: Home, target: str, host: Transport, recorded: Mapping[str, Any]) -> list[Finding]:
    """``avm status``: the gateway against what the apply recorded (``observations.gateway``):
    its unit (or the content classifier's, when a name inspects) not running, a rendered file
    or the classifier's code changed on disk, the generation Envoy's admin reports
    in force not the recorded one, the egress CA changed. Read-only."""
    from controlplane.promote.drift import Finding

    out: list[Finding] = []
    active = host.run(["systemctl", "is-active", tier1.UNIT], timeout=30).stdout.strip()
    if active != "active":
        out.append(Finding(where=tier1.UNIT, what="egress gateway unit", expected="active", actual=active))
    if recorded.get("classifier"):  # an inspected name: no classifier means every request is refused
        active = host.run(["systemctl", "is-active", tier1.CLASSIFIER_UNIT], timeout=30).stdout.strip()
        if active != "active":
            out.append(
                Finding(
                    where=tier1.CLASSIFIER_UNIT,
                    what="content classifier unit",
                    expected="active",
                    actual=active,
                )
            )
    asks = host.run(["systemctl", "is-active", tier1.RECORDER_UNITS[0]], timeout=30).stdout.strip()
    if asks != "active":  # agents' permission requests would be answered 503
        where, what = tier1.RECORDER_UNITS[0], "permission-request recorder socket"
        out.append(Finding(where=where, what=what, expected="active", actual=asks))
    want = dict(recorded.get("files", {}))
    if want and _changed(host, want):
        out_ = host.run(["sha256sum", "--", *sorted(want)], timeout=60).stdout
        have = {
            ln.split("  ", 1)[1]: "sha256:" + ln.split("  ", 1)[0] for ln in out_.splitlines() if "  " in ln
        }
        for path in sorted(p for p in want if have.get(p) != want[p]):
            what = "egress gateway config" if path.startswith(str(tier1.ETC)) else "egress boundary file"
            what = "content classifier code" if path.startswith(str(tier1.CLASSIFIER_LIB)) else what
            out.append(Finding(where=path, what=what, expected=want[path], actual=have.get(path, "missing")))
    in_force = read_in_force(host)
    recorded_versions = (recorded.get("generation"), recorded.get("cds_version"))
    if (in_force.get("lds"), in_force.get("cds")) != recorded_versions:
        actual = in_force.get("error") or f"lds {in_force.get('lds')}, cds {in_force.get('cds')}"
        out.append(
            Finding(
                where=f"{tier1.UNIT} admin {tier1.ADMIN_SOCKET}",
                what="egress policy generation in force",
                expected=str(recorded.get("generation")),
                actual=str(actual),
            )
        )
    ca = ca_for(home, target).fingerprint
    if ca != recorded.get("egress_ca"):
        out.append(
            Finding(
                where=str(target_dir(home, target) / "ca"),
                what="egress CA",
                expected=str(recorded.get("egress_ca")),
                actual=ca,
            )
        )
    return out


def audit_events(host: Transport, since: str, limit: int = 200) -> list[dict[str, Any]]:
    """Tier-1 ``egress.denied``, ``classifier.denied`` and ``tool.denied`` (each, up to ``limit``)
    and ``egress.allowed`` (a count per profile, destination and policy) from the gateway's access
    log on the host, since ``since`` (ISO 8601 UTC, what the log's ``t`` is).
    Read as root; the log holds no header values."""
    from collections import Counter

    from controlplane.boundary import events

    result = host.run(["tail", "-c", str(4 << 20), str(tier1.ACCESS_LOG)], timeout=60)
    if not result.ok:
        return []
    seen = [
        e
        for e in map(events.parse_line, result.stdout.splitlines())
        if e is not None and e.identity.startswith("profile:") and e.t >= since
    ]
    out: list[dict[str, Any]] = [
        {
            "type": e.event,
            "profile": e.identity.removeprefix("profile:"),
            "host": e.host,
            "method": e.method,
            "path": e.path,
            "code": e.code,
            "reason": e.reason,
            "policy": e.policy,
            # a classifier's verdict: the finding kinds, never what matched
            **(
                {"sensitivity": e.sensitivity, "findings": list(e.findings), "classifier": e.classifier}
                if e.event == "classifier.denied"
                else {}
            ),
            **({"tool": e.tool} if e.event == "tool.denied" else {}),
        }
        for e in seen
        if e.event in ("egress.denied", "classifier.denied", "tool.denied")
    ][:limit]
    allowed = Counter(
        (e.identity.removeprefix("profile:"), f"{e.method} {e.host}", e.policy)
        for e in seen
        if e.event == "egress.allowed"
    )
    for (profile, destination, policy), count in sorted(allowed.items()):
        out.append(
            {
                "type": "egress.allowed",
                "profile": profile,
                "destination": destination,
                "count": count,
                "policy": policy,
            }
        )
    return out


def read_log(host: Transport, offset: int | None = None, tail: int = 200) -> tuple[list[dict[str, Any]], int]:
    """The gateway's Tier-1 events from byte ``offset`` of its access log (None: the last
    ``tail`` ones), and the offset to read on from. One ``tail``/``wc`` round trip."""
    from controlplane.boundary import events

    log = str(tier1.ACCESS_LOG)
    size_out = host.run(["stat", "-c", "%s", log], timeout=30)
    size = int(size_out.stdout.strip()) if size_out.ok and size_out.stdout.strip().isdigit() else 0
    start = max(0, size - (1 << 20)) if offset is None else min(offset, size)
    if size <= start:
        return [], size
    chunk = host.run(["tail", "-c", f"+{start + 1}", log], timeout=60).stdout
    complete, _, _ = chunk.rpartition("\n")  # a line still being written is read next time
    seen = [
        e.to_dict() | {"profile": e.identity.removeprefix("profile:")}
        for e in map(events.parse_line, complete.splitlines())
        if e is not None and e.identity.startswith("profile:")
    ]
    return (seen[-tail:] if offset is None else seen), start + len(complete.encode()) + (1 if complete else 0)
