"""The egress gateway on a Tier-1 host: prepared with the render, installed by apply, proven.

``prepare(home, target, manifest, profiles)`` renders ``boundary.tier1`` for the profiles that
list names (the per-target egress CA is made in the avm home; its key never leaves it), so the
plan's drop-ins carry the gateway's digest. ``install`` writes the files (credential values from
the home's secret store, 0640 root:avm-gateway, never in the plan or the receipt), the unit
``avm-gateway.service`` under its own user (and ``avm-classifier.service`` when a name inspects:
``promote.classifier``), (re)starts it only when its files changed, reads the
generation in force from Envoy's admin socket until it is the rendered one, and loads the
``inet avm_boundary`` table (nspawn: from the host side, into the VM's namespace). When a
profile lists an MCP server, the pinning service ``avm-mcppin.service`` (its own user) is
installed and started first: the gateway sends that server's requests through it.
The probes, the admin reads and drift are in ``promote.gatewaycheck``.

Per target, ``<home>/egress/<target>/``: ``ca/`` (the egress CA) and the optional options file
of ``promote.gwoptions`` (a private upstream CA, pinned upstream addresses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane import hostscripts
from controlplane.boundary import tier1
from controlplane.boundary.ca import EgressCA
from controlplane.boundary.requests import RECORDER_USER
from controlplane.canonical import sha256_digest
from controlplane.errors import OperationalError
from controlplane.promote import gwoptions
from controlplane.promote.layout import LAYOUT

if TYPE_CHECKING:
    from controlplane.boundary.policy import EgressPolicy
    from controlplane.evidence.step import Step
    from controlplane.home import Home
    from controlplane.release.manifest import Profile
    from controlplane.transport.base import Transport
    from controlplane.transport.inventory import Target

UNIT_FILE = files("controlplane").joinpath("data", tier1.UNIT)
BOUNDARY_UNIT_FILE = files("controlplane").joinpath("data", tier1.BOUNDARY_UNIT)
PIN_UNIT_FILE = files("controlplane").joinpath("data", tier1.PIN_UNIT)


def target_dir(home: Home, target: str) -> Path:
    return home.root / "egress" / target


def ca_for(home: Home, target: str) -> EgressCA:
    return EgressCA.ensure(target_dir(home, target) / "ca", common_name=f"avm egress CA ({target})")


def prepare(home: Home, target: str, profiles: Sequence[Profile]) -> tier1.Tier1Gateway | None:
    """The host's gateway for ``profiles`` (None when no profile lists a name)."""
    if not any(p.egress_names.names for p in profiles):
        return None
    return prepare_policies(
        home,
        target,
        {p.name: p.egress_names for p in profiles},
        ip_rules={p.name: [(r.host, r.port, r.proto) for r in p.egress] for p in profiles},
        tiers={p.name: p.risk_tier for p in profiles},
    )


def prepare_policies(
    home: Home,
    target: str,
    policies: Mapping[str, EgressPolicy],
    *,
    ip_rules: Mapping[str, Sequence[tuple[str, int, str]]],
    tiers: Mapping[str, str],
) -> tier1.Tier1Gateway | None:
    """The host's gateway for these policies (a manifest's, or the recorded ones with granted
    requests), listeners kept on the addresses the last apply recorded."""
    from controlplane.promote.state import recorded_state
    from controlplane.promote.status import _recorded_gateway

    ca = ca_for(home, target)
    upstream_ca, pins = gwoptions.read(home, target)
    prior = recorded_state(home, target)
    recorded = (_recorded_gateway(home, prior[0]) or {}) if prior else {}
    previous = {p: str(a).split(":", 1)[0] for p, a in recorded.get("listeners", {}).items()}
    return tier1.render_host(
        policies,
        ca_cert=ca.cert_path.read_bytes(),
        ca_fingerprint=ca.fingerprint,
        upstream_ca=upstream_ca,
        upstreams=pins,
        previous=previous,
        ip_rules=ip_rules,
        tiers=tiers,
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
        if lds_cds or f.path not in (str(tier1.ETC / "lds.json"), str(tier1.ETC / "cds.json"))
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
        out.append((str(tier1.RECORDER), hostscripts.text("request_recorder").encode(), 0o644, "root"))
        for unit in tier1.RECORDER_UNITS:
            data = files("controlplane").joinpath("data", unit).read_bytes()
            out.append((f"{LAYOUT.unit_dir}/{unit}", data, 0o644, "root"))
        out.append((f"{LAYOUT.unit_dir}/{tier1.UNIT}", UNIT_FILE.read_bytes(), 0o644, "root"))
        out.append(
            (f"{LAYOUT.unit_dir}/{tier1.BOUNDARY_UNIT}", BOUNDARY_UNIT_FILE.read_bytes(), 0o644, "root")
        )
        if gw.mcp_pin:
            out.append((f"{LAYOUT.unit_dir}/{tier1.PIN_UNIT}", PIN_UNIT_FILE.read_bytes(), 0o644, "root"))
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


def _ensure_user(host: Transport, user: str = tier1.USER) -> None:
    if host.run(["id", "-u", user], timeout=30).ok:
        return
    argv = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
    host.run([*argv, "--shell", "/usr/sbin/nologin", user], timeout=60).check()


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
    _ensure_user(host, tier1.CLASSIFIER_USER)  # the gateway's unit names its group (SupplementaryGroups)
    _ensure_user(host)
    _ensure_user(host, RECORDER_USER)
    dirs = [
        (tier1.ETC, "750", tier1.USER),
        (tier1.ETC / "sds", "750", tier1.USER),
        (tier1.CERTS, "750", tier1.USER),
        (tier1.SECRETS, "750", tier1.USER),
        (tier1.BOUNDARY, "755", "root"),
    ]
    if gw.mcp_pin:  # the pinning service: its own user, its own files, none of the gateway's
        _ensure_user(host, tier1.PIN_USER)
        dirs += [(tier1.PIN_ETC, "750", tier1.PIN_USER), (tier1.PIN_SCRIPT.parent, "755", "root")]
    for d, dmode, dgroup in dirs:
        host.run(["install", "-d", "-m", dmode, "-o", "root", "-g", dgroup, str(d)], timeout=30).check()
    blobs_ = blobs(home, target.name, gw, values)
    on_disk = {path: sha256_digest(data) for path, data, _, _ in blobs_}
    restart = _changed(host, on_disk) or not host.run(["systemctl", "is-active", "--quiet", tier1.UNIT]).ok
    for path, data, mode, group in sorted(blobs_, key=lambda b: b[0].endswith("lds.json")):
        put_file(host, path, data, mode, group)
    # the one reload of this stage: it loads the unit files just written; every `enable` after
    # it only adds the boot-time symlinks (--no-reload: a reload each costs ~4 s under TCG)
    step.command(host.run(["systemctl", "daemon-reload"], timeout=60).check())
    from controlplane.promote import classifier

    classifier.ensure(host, gw, step)  # up before the gateway takes a request it must inspect
    if gw.mcp_pin:  # before Envoy routes to it; it re-reads its config when the file changes
        step.command(host.run(["systemctl", "enable", "--no-reload", tier1.PIN_UNIT], timeout=60).check())
        step.command(
            host.run(["systemctl", "restart" if restart else "start", tier1.PIN_UNIT], timeout=60).check()
        )
    step.command(host.run(["systemctl", "enable", "--no-reload", tier1.UNIT], timeout=60).check())
    verb = "restart" if restart else "start"
    step.command(host.run(["systemctl", verb, tier1.UNIT], timeout=60).check())
    # the permission-request recorder: socket-activated; a changed script is used from the next request
    step.command(
        host.run(["systemctl", "enable", "--no-reload", "--now", tier1.RECORDER_UNITS[0]], timeout=60).check()
    )
    step.command(host.run(["systemctl", "try-restart", tier1.RECORDER_UNITS[1]], timeout=60).check())
    from controlplane.promote.gatewaycheck import wait_in_force

    in_force = wait_in_force(host, gw.generation, gw.cds_version)
    step.observe("gateway", {**gw.describe(), "in_force": in_force, "restarted": restart})
    step.observe("gateway_policies", gw.policy_record())
    ok = (in_force.get("lds"), in_force.get("cds")) == (gw.generation, gw.cds_version)
    step.check(
        "gateway-in-force",
        ok=ok,
        detail=f"admin: lds {in_force.get('lds')}, cds {in_force.get('cds')}; "
        f"rendered {gw.generation}, clusters {gw.cds_version}",
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
    step.command(host.run(["systemctl", "enable", "--no-reload", tier1.BOUNDARY_UNIT], timeout=60).check())
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


def remove(target: Target, host: Transport, step: Step) -> None:
    """No profile lists a name any more: stop and remove the gateway, its files (credentials
    included) and the boundary table, so a removed policy is not left serving."""
    from controlplane._internal import netns as nx
    from controlplane.promote import classifier
    from controlplane.promote.enforcement import host_network
    from controlplane.transport.local import LocalTransport

    classifier.remove(host, step)
    units = [tier1.UNIT, tier1.BOUNDARY_UNIT, tier1.PIN_UNIT, *tier1.RECORDER_UNITS]
    step.command(host.run(["systemctl", "disable", "--now", *units], timeout=60))
    files = [
        str(tier1.ETC),
        str(tier1.BOUNDARY),
        str(tier1.PIN_ETC),
        str(tier1.PIN_SCRIPT),
        str(tier1.RECORDER),
        *(f"{LAYOUT.unit_dir}/{u}" for u in units),
    ]
    step.command(host.run(["rm", "-rf", "--", *files], timeout=60).check())
    step.command(host.run(["systemctl", "daemon-reload"], timeout=60).check())
    net = host_network(target)
    delete = ["nft", "delete", "table", "inet", tier1.TABLE]
    if net is not None:
        with LocalTransport() as local:
            local.run(nx.in_netns(net.netns, delete), timeout=15)
            left = local.run(
                nx.in_netns(net.netns, ["nft", "list", "table", "inet", tier1.TABLE]), timeout=15
            )
    else:
        host.run(delete, timeout=30)
        left = host.run(["nft", "list", "table", "inet", tier1.TABLE], timeout=30)
    gone = not host.run(["test", "-e", str(tier1.ETC)], timeout=30).ok
    step.check(
        "gateway-removed",
        ok=gone and not left.ok,
        detail=f"{tier1.UNIT} disabled; {tier1.ETC} {'removed' if gone else 'STILL THERE'}; "
        f"table inet {tier1.TABLE} {'still loaded' if left.ok else 'deleted'}",
    )
