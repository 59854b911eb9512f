"""The gateway on a Tier-1 host: every file it needs, rendered from the profiles' policies. Pure.

One Envoy (``avm-gateway.service``, user ``avm-gateway``) serves every profile of the host, each
on its own loopback address ``127.100.0.<n>`` (``n`` a function of the profile's name, so it is
stable while profiles come and go): the address is who is calling. What goes to the host::

    /etc/avm/gateway/             root:avm-gateway 0750  bootstrap, LDS, CDS, sds/ (references)
    /etc/avm/gateway/certs/       root:avm-gateway 0750  a leaf per listed name (key 0640)
    /etc/avm/gateway/secrets/     root:avm-gateway 0750  credential values (0640), never an agent's
    /etc/avm/boundary/<p>/hosts   0644  the profile's names -> its listener (bound over /etc/hosts)
    /etc/avm/boundary/<p>/nsswitch.conf  0644  ``hosts: files`` (nothing else resolves)
    /etc/avm/boundary/egress-ca.pem      0644  the egress CA certificate the agents trust
    /run/avm-gateway/admin.sock          0600 (avm-gateway): Envoy's admin, root reaches it
    /usr/local/lib/avm-classifier/       0644  the reference classifier (stdlib; when a name inspects)
    /run/avm-classifier/classifier.sock  0660 avm-classifier: its ext_authz service; the gateway's
                                         user is in its group, no agent is

When a profile lists an MCP server (``mcp: true``), the pinning service runs beside it
(``avm-mcppin.service``, user ``avm-mcppin``, on ``127.0.0.1:15301``: no agent uid may connect
there, the ``avm_boundary`` table lets each reach its own listener only)::

    /usr/local/lib/avm/mcppin.py         0644  controlplane/boundary/mcppin.py, as it is
    /etc/avm/mcppin/                     root:avm-mcppin 0750  config.json (rules, pins), upstream-ca.pem
    /run/avm-requests/requests.sock      0660 avm-requests:avm-gateway: the request recorder
    /var/lib/avm-requests/               0750 avm-requests: permission requests as they came

Each profile's hosts file also names ``avm.boundary`` (its listener's port 80: ``GET /policy``,
``POST /requests``, ``boundary.api``); the table opens that port to the profile's uid too.

``render_host`` returns the non-secret files (with their digests: the plan covers them) and
what apply must add: a leaf per name (minted by the per-target CA in the avm home; the CA key
never leaves it) and a value per credential ref (from the home's secret store).
``nft_script`` is the ``inet avm_boundary`` table: each agent uid may open new connections to
its own listener and its IP rules only; everything else, DNS and IPv6 included, is dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path

from controlplane.boundary import mcppin
from controlplane.boundary.contentgate import Classifier
from controlplane.boundary.policy import EgressPolicy
from controlplane.boundary.render import GatewaySpec, Listener, Rendered, documents, dump, render
from controlplane.boundary.requests import PORT as REQUESTS_PORT
from controlplane.boundary.requests import RESERVED
from controlplane.canonical import canonical_bytes, sha256_digest

USER = "avm-gateway"
UNIT = "avm-gateway.service"
BOUNDARY_UNIT = "avm-boundary.service"  # loads the table at boot (skipped in a container)
ETC = Path("/etc/avm/gateway")
CERTS = ETC / "certs"
SECRETS = ETC / "secrets"
BOUNDARY = Path("/etc/avm/boundary")
CA_BUNDLE = BOUNDARY / "egress-ca.pem"
BOUNDARY_NFT = BOUNDARY / "boundary.nft"
UPSTREAM_CA = ETC / "upstream-ca.pem"
ADMIN_SOCKET = Path("/run/avm-gateway/admin.sock")
ACCESS_LOG = Path("/var/log/avm-gateway/access.log")
SYSTEM_TRUST = Path("/etc/ssl/certs/ca-certificates.crt")
# the content classifier (avm-classifier.service, its own user, no network: a unix socket only)
CLASSIFIER_USER = "avm-classifier"
CLASSIFIER_UNIT = "avm-classifier.service"
CLASSIFIER_LIB = Path("/usr/local/lib/avm-classifier")
CLASSIFIER_SOCKET = Path("/run/avm-classifier/classifier.sock")
PIN_USER = "avm-mcppin"
PIN_UNIT = "avm-mcppin.service"
PIN_ETC = Path("/etc/avm/mcppin")
PIN_CONFIG = PIN_ETC / "config.json"
PIN_CA = PIN_ETC / "upstream-ca.pem"
PIN_SCRIPT = Path("/usr/local/lib/avm/mcppin.py")
PIN_LISTEN = ("127.0.0.1", 15301)
NET = ipaddress.IPv4Network("127.100.0.0/24")
TABLE = "avm_boundary"
# permission requests (``boundary.requests``): the recorder, under its own user, on a socket
# only the gateway's group can connect to; what it stores, root and it read
REQUESTS_SOCKET = Path("/run/avm-requests/requests.sock")
REQUESTS_DIR = Path("/var/lib/avm-requests")
RECORDER = Path("/usr/local/lib/avm/request_recorder.py")
RECORDER_UNITS = ("avm-requests.socket", "avm-requests.service")
NSSWITCH = b"passwd: files\ngroup: files\nshadow: files\ngshadow: files\nhosts: files\n"


@dataclasses.dataclass(frozen=True)
class HostFile:
    path: str
    data: bytes
    mode: int
    group: str = "root"  # "avm-gateway": the gateway reads it, no agent can

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)


@dataclasses.dataclass(frozen=True)
class Tier1Gateway:
    """The rendered gateway of one host. ``digest`` covers every file, leaf and ref by name."""

    files: tuple[HostFile, ...]
    rendered: Rendered
    addresses: dict[str, str]  # profile -> listener address
    policies: dict[str, EgressPolicy]  # profile -> its names
    leaves: tuple[str, ...]  # listed hosts that need a leaf on the host
    refs: tuple[str, ...]  # credential refs whose values the gateway needs
    ca_fingerprint: str
    # every profile of the manifest -> its IP rules (host or CIDR, port, proto): the table names
    # every agent uid, not only those of the profiles a promotion restarts
    ip_rules: dict[str, tuple[tuple[str, int, str], ...]] = dataclasses.field(default_factory=dict)
    tiers: dict[str, str] = dataclasses.field(default_factory=dict)  # profile -> risk tier

    def policy_record(self) -> dict[str, object]:
        """For receipts: each profile's policy itself, its IP rules and tier (what a permission
        request is merged into, and how many approvers it needs). No credential values."""
        return {
            p: {
                "names": pol.model_dump(mode="json")["names"],
                "ip_rules": [list(r) for r in self.ip_rules.get(p, ())],
                "tier": self.tiers.get(p),
            }
            for p, pol in self.policies.items()
        }

    @property
    def generation(self) -> str:
        return self.rendered.generation

    @property
    def inspects(self) -> bool:
        """Some listed name is ``inspect: true``: the host needs the classifier."""
        return any(r.inspect for pol in self.policies.values() for r in pol.names)

    @property
    def mcp_pin(self) -> bool:
        """Whether a profile lists an MCP server (the pinning service runs then)."""
        return self.rendered.mcp_pin is not None

    @property
    def cds_version(self) -> str:
        """The clusters' own version (a policy change that keeps the destinations keeps it)."""
        return self.rendered.cds_version

    @property
    def digest(self) -> str:
        doc = {
            "files": {f.path: [f.digest, oct(f.mode), f.group] for f in self.files},
            "leaves": list(self.leaves),
            "refs": list(self.refs),
            "ca": self.ca_fingerprint,
        }
        return sha256_digest(canonical_bytes(doc))

    def describe(self) -> dict[str, object]:
        """For plans and receipts: digests and names only (never a credential value)."""
        return {
            "generation": self.generation,
            "cds_version": self.cds_version,
            "digest": self.digest,
            "egress_ca": self.ca_fingerprint,
            "listeners": {
                p: f"{a}:{','.join(map(str, self.policies[p].ports))}" for p, a in self.addresses.items()
            },
            "policies": {p: pol.generation for p, pol in self.policies.items()},
            "credentials": list(self.refs),
            "files": {f.path: f.digest for f in self.files} | self.classifier_files(),
            # the content classifier this gateway asks (None: no listed name inspects)
            "classifier": {"unit": CLASSIFIER_UNIT, "socket": str(CLASSIFIER_SOCKET)}
            if self.inspects
            else None,
        }

    def classifier_files(self) -> dict[str, str]:
        """The classifier's sources on the host -> digest (none when no name inspects)."""
        if not self.inspects:
            return {}
        from controlplane.boundary import classifyd

        return {str(CLASSIFIER_LIB / rel): sha256_digest(data) for rel, data in classifyd.sources().items()}


def addresses(
    profiles: Sequence[str], previous: Mapping[str, str] | None = None
) -> dict[str, ipaddress.IPv4Address]:
    """Each profile's listener address in ``127.100.0.1-254``. A profile keeps its ``previous``
    address (what the last apply recorded); a new one gets ``n`` from a hash of its name, or
    the next free one on a collision (in name order). Pure."""
    names = sorted(set(profiles))
    taken: dict[int, str] = {}
    for name, addr in sorted((previous or {}).items()):
        n = int(ipaddress.IPv4Address(addr)) - int(NET.network_address) - 1
        if name in names and 0 <= n < 254 and n not in taken:
            taken[n] = name
    for name in (x for x in names if x not in taken.values()):
        n = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 254
        while n in taken:
            n = (n + 1) % 254
        taken[n] = name
    return {name: NET.network_address + n + 1 for n, name in taken.items()}


def leaf_paths(host: str) -> tuple[Path, Path]:
    stem = host.replace("*", "_wildcard_")
    return CERTS / f"{stem}.pem", CERTS / f"{stem}.key"


def secret_path(ref: str) -> Path:
    return SECRETS / ref.rsplit("/", 1)[1]


def hosts_file(profile: str) -> Path:
    return BOUNDARY / profile / "hosts"


def nsswitch_file(profile: str) -> Path:
    return BOUNDARY / profile / "nsswitch.conf"


def render_host(
    policies: Mapping[str, EgressPolicy],
    *,
    ca_cert: bytes,
    ca_fingerprint: str,
    upstream_ca: bytes | None = None,
    upstreams: Mapping[str, tuple[str, int]] | None = None,
    previous: Mapping[str, str] | None = None,
    ip_rules: Mapping[str, Sequence[tuple[str, int, str]]] | None = None,
    tiers: Mapping[str, str] | None = None,
) -> Tier1Gateway | None:
    """The gateway for the profiles that list names (None when none does). Pure.

    ``upstream_ca``: what upstream servers are verified against (default: the host's system
    trust store); ``upstreams``: ``host:port`` -> a pinned ``(address, port)``.
    """
    named = {p: pol for p, pol in sorted(policies.items()) if pol.names}
    if not named:
        return None
    addrs = addresses(list(named), previous)
    rules = [r for pol in named.values() for r in pol.names]
    leaves = tuple(sorted({r.host for r in rules}))
    refs = tuple(sorted({r.credential.ref for r in rules if r.credential}))
    spec = GatewaySpec(
        listeners=tuple(Listener(f"profile:{p}", addrs[p], pol) for p, pol in named.items()),
        xds_dir=ETC,
        admin_socket=ADMIN_SOCKET,
        access_log=ACCESS_LOG,
        trusted_ca=UPSTREAM_CA if upstream_ca is not None else SYSTEM_TRUST,
        leaves={h: leaf_paths(h) for h in leaves},
        secrets={ref: secret_path(ref) for ref in refs},
        upstreams=dict(upstreams or {}),
        classifier=Classifier(CLASSIFIER_SOCKET),
        mcp_pin=PIN_LISTEN if any(r.mcp for r in rules) else None,
        requests_socket=REQUESTS_SOCKET,
    )
    rendered = render(spec)
    docs = documents(rendered)
    pin = docs.pop("mcp-pin.json", None)
    files = [HostFile(str(ETC / rel), dump(doc), 0o640, USER) for rel, doc in sorted(docs.items())]
    if upstream_ca is not None:
        files.append(HostFile(str(UPSTREAM_CA), upstream_ca, 0o640, USER))
    if pin is not None:  # its own user reads its own copies: never the gateway's secrets
        cafile = str(PIN_CA if upstream_ca is not None else SYSTEM_TRUST)
        pin = {**pin, "rules": {k: {**v, "cafile": cafile} for k, v in pin["rules"].items()}}
        files.append(HostFile(str(PIN_CONFIG), dump(pin), 0o640, PIN_USER))
        if upstream_ca is not None:
            files.append(HostFile(str(PIN_CA), upstream_ca, 0o640, PIN_USER))
        files.append(HostFile(str(PIN_SCRIPT), Path(mcppin.__file__).read_bytes(), 0o644))
    files.append(HostFile(str(CA_BUNDLE), ca_cert, 0o644))
    for p, pol in named.items():
        listed = sorted({r.host for r in pol.names if not r.wildcard})
        text = "127.0.0.1 localhost\n" + "".join(f"{addrs[p]} {h}\n" for h in [*listed, RESERVED])
        files.append(HostFile(str(hosts_file(p)), text.encode(), 0o644))
        files.append(HostFile(str(nsswitch_file(p)), NSSWITCH, 0o644))
    return Tier1Gateway(
        files=tuple(files),
        rendered=rendered,
        addresses={p: str(a) for p, a in addrs.items()},
        policies=named,
        leaves=leaves,
        refs=refs,
        ca_fingerprint=ca_fingerprint,
        ip_rules={p: tuple(r) for p, r in sorted((ip_rules or {}).items())},
        tiers=dict(tiers or {}),
    )


def dropin_lines(gateway: Tier1Gateway, profile: str) -> list[str]:
    """The agent unit's lines for the boundary: its hosts file over /etc/hosts, only files for
    names, the egress CA as its trust store. The digest line makes the drop-in (and so the plan)
    change whenever the gateway does."""
    if profile not in gateway.addresses:
        return []
    bundle = str(CA_BUNDLE)
    return [
        f"# egress gateway {gateway.digest}: listener {gateway.addresses[profile]}",
        f"BindReadOnlyPaths={hosts_file(profile)}:/etc/hosts {nsswitch_file(profile)}:/etc/nsswitch.conf",
        f"Environment=SSL_CERT_FILE={bundle} REQUESTS_CA_BUNDLE={bundle} NODE_EXTRA_CA_CERTS={bundle}",
        "[Unit]",
        f"Requires={BOUNDARY_UNIT}",
        f"After={BOUNDARY_UNIT}",
    ]


def nft_script(
    gateway: Tier1Gateway | None,
    uids: Mapping[str, int],
    ip_rules: Mapping[str, Sequence[tuple[str, int, str]]],
) -> str:
    """The ``inet avm_boundary`` table, replaced atomically. For each profile in ``uids``: replies
    (established) pass; new connections only to its own listener's ports (when it lists names)
    and to its IP rules; everything else is dropped and counted: DNS, other profiles' listeners,
    IPv6. Evaluated before ``avm_egress`` (priority filter - 10), so a dropped UDP send fails with EPERM
    (a TCP connect times out). Pure."""
    t = f"inet {TABLE}"
    lines = [
        f"add table {t}",
        f"delete table {t}",
        f"add table {t}",
        f"add map {t} by_uid {{ type uid : verdict; }}",
        f"add chain {t} output {{ type filter hook output priority filter - 10; policy accept; }}",
        f"add rule {t} output meta skuid vmap @by_uid",
    ]
    for profile, uid in sorted(uids.items()):
        chain = f"profile-{profile}"
        lines += [
            f"add counter {t} denied-{profile}",
            f"add chain {t} {chain}",
            f'add rule {t} {chain} ct state established,related accept comment "replies"',
        ]
        if gateway is not None and profile in gateway.addresses:
            ports = ", ".join(map(str, (*gateway.policies[profile].ports, REQUESTS_PORT)))
            lines.append(
                f"add rule {t} {chain} ip daddr {gateway.addresses[profile]} tcp dport {{ {ports} }} "
                'accept comment "own listener"'
            )
        for i, (dest, port, proto) in enumerate(ip_rules.get(profile, ())):
            net = ipaddress.ip_network(dest, strict=False)
            family = "ip" if net.version == 4 else "ip6"
            lines.append(
                f'add rule {t} {chain} {family} daddr {net} {proto} dport {port} accept comment "allow[{i}]"'
            )
        lines += [
            f'add rule {t} {chain} counter name "denied-{profile}" drop comment "default drop"',
            f"add element {t} by_uid {{ {uid} : jump {chain} }}",
        ]
    return "\n".join(lines) + "\n"
