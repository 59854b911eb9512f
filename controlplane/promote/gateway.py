"""The egress gateway on a Tier-1 host: prepared with the render, installed by apply, proven.

``prepare(home, target, manifest, profiles)`` renders ``boundary.tier1`` for the profiles that
list names (the per-target egress CA is made in the avm home; its key never leaves it), so the
plan's drop-ins carry the gateway's digest. ``install`` writes the files (credential values from
the home's secret store, 0640 root:avm-gateway, never in the plan or the receipt), the unit
``avm-gateway.service`` under its own user, (re)starts it only when its files changed, reads the
generation in force from Envoy's admin socket until it is the rendered one, and loads the
``inet avm_boundary`` table (nspawn: from the host side, into the VM's namespace).
``probe`` runs ``hostscripts/gateway_probe.py`` and turns its outcomes into checks.

Per target, ``<home>/egress/<target>/``: ``ca/`` (the egress CA) and an optional
``gateway.json``: ``{"upstream_ca": PEM path, "upstreams": {"host:port": [addr, port]}}`` for
upstreams verified against a private CA or reached at a pinned address.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane import hostscripts
from controlplane.boundary import tier1
from controlplane.boundary.ca import EgressCA
from controlplane.canonical import sha256_digest
from controlplane.errors import OperationalError, UsageError
from controlplane.promote.layout import LAYOUT

if TYPE_CHECKING:
    from controlplane.evidence.step import Step
    from controlplane.home import Home
    from controlplane.promote.drift import Finding
    from controlplane.release.manifest import Profile
    from controlplane.transport.base import Transport
    from controlplane.transport.inventory import Target

UNIT_FILE = files("controlplane").joinpath("data", tier1.UNIT)
BOUNDARY_UNIT_FILE = files("controlplane").joinpath("data", tier1.BOUNDARY_UNIT)
PROBE_TIMEOUT_S = 3.0
_DENIED = ("errno 1", "errno 13", "errno 113", "timeout")  # EPERM: dropped by netfilter


def target_dir(home: Home, target: str) -> Path:
    return home.root / "egress" / target


def ca_for(home: Home, target: str) -> EgressCA:
    return EgressCA.ensure(target_dir(home, target) / "ca", common_name=f"avm egress CA ({target})")


def _options(home: Home, target: str) -> tuple[bytes | None, dict[str, tuple[str, int]]]:
    path = target_dir(home, target) / "gateway.json"
    if not path.exists():
        return None, {}
    try:
        doc = json.loads(path.read_text())
        ca = Path(doc["upstream_ca"]).read_bytes() if doc.get("upstream_ca") else None
        pins = {k: (str(v[0]), int(v[1])) for k, v in doc.get("upstreams", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UsageError(
            "gateway-options-invalid",
            f"{path}: expected {{upstream_ca: PEM path, upstreams: {{host:port: [addr, port]}}}}: {exc}",
            hint="fix or remove the file",
        ) from exc
    return ca, pins


def prepare(home: Home, target: str, profiles: Sequence[Profile]) -> tier1.Tier1Gateway | None:
    """The host's gateway for ``profiles`` (None when no profile lists a name)."""
    if not any(p.egress_names.names for p in profiles):
        return None
    from controlplane.promote.state import recorded_state
    from controlplane.promote.status import _recorded_gateway

    ca = ca_for(home, target)
    upstream_ca, pins = _options(home, target)
    prior = recorded_state(home, target)
    recorded = (_recorded_gateway(home, prior[0]) or {}) if prior else {}
    previous = {p: str(a).split(":", 1)[0] for p, a in recorded.get("listeners", {}).items()}
    return tier1.render_host(
        {p.name: p.egress_names for p in profiles},
        ca_cert=ca.cert_path.read_bytes(),
        ca_fingerprint=ca.fingerprint,
        upstream_ca=upstream_ca,
        upstreams=pins,
        previous=previous,
        ip_rules={p.name: [(r.host, r.port, r.proto) for r in p.egress] for p in profiles},
    )


Blob = tuple[str, bytes, int, str]  # path, bytes, mode, group


def blobs(
    home: Home, target: str, gw: tier1.Tier1Gateway, values: Mapping[str, bytes], *, lds_cds: bool = True
) -> list[Blob]:
    """Every file of the gateway with its bytes: rendered files, leaves (minted now by the
    target's CA), credential values, the unit. ``lds_cds=False``: without LDS and CDS (a hot
    reload renames those itself, in order)."""
    ca = ca_for(home, target)
    out: list[Blob] = [
        (f.path, f.data, f.mode, f.group)
        for f in gw.files
        if lds_cds or f.path not in (str(tier1.ETC / "lds.yaml"), str(tier1.ETC / "cds.yaml"))
    ]
    for name in gw.leaves:
        cert, key = ca.leaf(name)
        cpath, kpath = tier1.leaf_paths(name)
        out += [
            (str(cpath), cert.read_bytes(), 0o644, "root"),
            (str(kpath), key.read_bytes(), 0o640, tier1.USER),
        ]
    out += [(str(tier1.secret_path(ref)), values[ref], 0o640, tier1.USER) for ref in gw.refs]
    if lds_cds:
        out.append((f"{LAYOUT.unit_dir}/{tier1.UNIT}", UNIT_FILE.read_bytes(), 0o644, "root"))
        out.append(
            (f"{LAYOUT.unit_dir}/{tier1.BOUNDARY_UNIT}", BOUNDARY_UNIT_FILE.read_bytes(), 0o644, "root")
        )
    return out


def put_file(host: Transport, path: str, data: bytes, mode: int, group: str) -> None:
    """Write one gateway file atomically, owner and mode set before it is renamed into place
    (Envoy reads a watched file on the rename: it must be readable by then). A group-readable
    file is 0600 root until its group is the gateway's."""
    parent, name = str(Path(path).parent), Path(path).name
    host.run(["mkdir", "-p", parent], timeout=30).check()
    if group == "root":
        host.put(data, path, mode=mode)
        return
    staged = f"{parent}/.{name}.avm-new"
    host.put(data, staged, mode=0o600)
    host.run(["chown", f"root:{group}", staged], timeout=30).check()
    host.run(["chmod", oct(mode)[2:], staged], timeout=30).check()
    host.run(["mv", "-f", staged, path], timeout=30).check()


def _ensure_user(host: Transport) -> None:
    if host.run(["id", "-u", tier1.USER], timeout=30).ok:
        return
    argv = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
    host.run([*argv, "--shell", "/usr/sbin/nologin", tier1.USER], timeout=60).check()


def _changed(host: Transport, want: Mapping[str, str]) -> bool:
    argv = ["sha256sum", "--", *sorted(want)]
    out = host.run(argv, timeout=60).stdout
    have = {
        line.split("  ", 1)[1]: "sha256:" + line.split("  ", 1)[0]
        for line in out.splitlines()
        if "  " in line
    }
    return have != dict(want)


def install(
    home: Home,
    target: Target,
    host: Transport,
    gw: tier1.Tier1Gateway,
    values: Mapping[str, bytes],
    uids: Mapping[str, int],
    ip_rules: Mapping[str, Sequence[tuple[str, int, str]]],
    step: Step,
) -> None:
    """Install and (re)start the gateway, prove its generation in force, load the nft table.

    Raises ``OperationalError('gateway-not-in-force')`` when Envoy does not report the rendered
    generation (the unit's journal tail in the message), ``CommandFailed`` from the host."""
    _ensure_user(host)
    for d, dmode, dgroup in (
        (tier1.ETC, "750", tier1.USER),
        (tier1.ETC / "sds", "750", tier1.USER),
        (tier1.CERTS, "750", tier1.USER),
        (tier1.SECRETS, "750", tier1.USER),
        (tier1.BOUNDARY, "755", "root"),
    ):
        host.run(["install", "-d", "-m", dmode, "-o", "root", "-g", dgroup, str(d)], timeout=30).check()
    blobs_ = blobs(home, target.name, gw, values)
    on_disk = {path: sha256_digest(data) for path, data, _, _ in blobs_}
    restart = _changed(host, on_disk) or not host.run(["systemctl", "is-active", "--quiet", tier1.UNIT]).ok
    for path, data, mode, group in sorted(blobs_, key=lambda b: b[0].endswith("lds.yaml")):
        put_file(host, path, data, mode, group)
    step.command(host.run(["systemctl", "daemon-reload"], timeout=60).check())
    step.command(host.run(["systemctl", "enable", tier1.UNIT], timeout=60).check())
    verb = "restart" if restart else "start"
    step.command(host.run(["systemctl", verb, tier1.UNIT], timeout=60).check())
    in_force = wait_in_force(host, gw.generation)
    step.observe("gateway", {**gw.describe(), "in_force": in_force, "restarted": restart})
    ok = in_force.get("lds") == gw.generation == in_force.get("cds")
    step.check(
        "gateway-in-force",
        ok=ok,
        detail=f"admin: lds {in_force.get('lds')}, cds {in_force.get('cds')}; rendered {gw.generation}",
    )
    if not ok:
        tail = host.run(["journalctl", "-u", tier1.UNIT, "-n", "20", "--no-pager"], timeout=30).stdout
        raise OperationalError(
            "gateway-not-in-force",
            f"the egress gateway does not report generation {gw.generation}: {in_force}",
            hint=f"the unit's journal: {tail[-800:]}",
        )
    load_table(target, host, tier1.nft_script(gw, uids, ip_rules), step)


def load_table(target: Target, host: Transport, script: str, step: Step) -> None:
    """Load ``inet avm_boundary`` (checked by ``nft -c`` first). On nspawn from the host side
    into the VM's namespace, which the container's root cannot change; elsewhere on the host.
    Either way the script is also ``boundary.nft`` (0600), which ``avm-boundary.service``
    loads at boot (skipped in a container), and the unit is enabled."""
    host.put(script.encode(), str(tier1.BOUNDARY_NFT), mode=0o600)
    step.command(host.run(["systemctl", "enable", tier1.BOUNDARY_UNIT], timeout=60).check())
    from controlplane._internal import netns as nx
    from controlplane.promote.enforcement import host_network
    from controlplane.transport.local import LocalTransport

    net = host_network(target)
    if net is not None:
        with LocalTransport() as local:
            nx.nft(local, net.netns, ["-c", "-f", "-"], script=script)
            nx.nft(local, net.netns, ["-f", "-"], script=script)
            listed = local.run(
                nx.in_netns(net.netns, ["nft", "list", "table", "inet", tier1.TABLE]), timeout=15
            )
    else:
        host.run(["nft", "-c", "-f", "-"], stdin=script.encode(), timeout=30).check()
        host.run(["nft", "-f", "-"], stdin=script.encode(), timeout=30).check()
        listed = host.run(["nft", "list", "table", "inet", tier1.TABLE], timeout=30)
    step.check(
        "boundary-table",
        ok=listed.ok and "default drop" in listed.stdout,
        detail=f"table inet {tier1.TABLE}: {listed.stdout.count('jump profile-')} profile chain(s)",
    )


def _run_probe(host: Transport, request: dict[str, Any]) -> dict[str, Any]:
    argv = ["python3", "-c", hostscripts.text("gateway_probe"), json.dumps(request, sort_keys=True)]
    result = host.run(argv, timeout=120).check(hint="the gateway probe failed on the host")
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def read_in_force(host: Transport) -> dict[str, Any]:
    """What Envoy's admin reports now (``{"error": ...}`` when it does not answer)."""
    admin: dict[str, Any] = _run_probe(host, {"admin": str(tier1.ADMIN_SOCKET), "profiles": {}})["admin"]
    return admin


def wait_in_force(host: Transport, generation: str, attempts: int = 40) -> dict[str, Any]:
    import time

    seen: dict[str, Any] = {}
    for _ in range(attempts):
        seen = read_in_force(host)
        if seen.get("lds") == generation and seen.get("cds") == generation:
            return seen
        time.sleep(0.25)
    return seen


def _listed(gw: tier1.Tier1Gateway, profile: str) -> dict[str, Any]:
    rule = next(r for r in gw.policies[profile].names if not r.wildcard)
    path = rule.paths[0]
    path = path.removesuffix("*") + "avm-probe" if path.endswith("/*") else path
    method = "GET" if "GET" in rule.methods else rule.methods[0]
    return {"host": rule.host, "port": rule.port, "method": method, "path": path}


def probe(host: Transport, gw: tier1.Tier1Gateway, profiles: Sequence[str], step: Step) -> list[str]:
    """The boundary probed from each profile's sandbox; a check per probe. Returns the failed ones."""
    chosen = [p for p in profiles if p in gw.addresses]
    wanted: dict[str, dict[str, Any]] = {
        p: {"user": LAYOUT.user(p), "listed": _listed(gw, p)} for p in chosen
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
    its unit not running, a rendered file changed on disk, the generation Envoy's admin reports
    in force not the recorded one, the egress CA changed. Read-only."""
    from controlplane.promote.drift import Finding

    out: list[Finding] = []
    active = host.run(["systemctl", "is-active", tier1.UNIT], timeout=30).stdout.strip()
    if active != "active":
        out.append(Finding(where=tier1.UNIT, what="egress gateway unit", expected="active", actual=active))
    want = dict(recorded.get("files", {}))
    if want and _changed(host, want):
        out_ = host.run(["sha256sum", "--", *sorted(want)], timeout=60).stdout
        have = {
            ln.split("  ", 1)[1]: "sha256:" + ln.split("  ", 1)[0] for ln in out_.splitlines() if "  " in ln
        }
        for path in sorted(p for p in want if have.get(p) != want[p]):
            what = "egress gateway config" if path.startswith(str(tier1.ETC)) else "egress boundary file"
            out.append(Finding(where=path, what=what, expected=want[path], actual=have.get(path, "missing")))
    in_force = read_in_force(host)
    if (in_force.get("lds"), in_force.get("cds")) != (recorded.get("generation"),) * 2:
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
    """Tier-1 ``egress.denied`` (each, up to ``limit``) and ``egress.allowed`` (a count per
    profile, destination and policy) from the gateway's access log on the host, since ``since``
    (ISO 8601 UTC, what the log's ``t`` is). Read as root; the log holds no header values."""
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
            "type": "egress.denied",
            "profile": e.identity.removeprefix("profile:"),
            "host": e.host,
            "method": e.method,
            "path": e.path,
            "code": e.code,
            "reason": e.reason,
            "policy": e.policy,
        }
        for e in seen
        if e.event == "egress.denied"
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
