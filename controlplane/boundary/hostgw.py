"""One egress gateway per host for Tier-2 jobs, with a listener per job added by a file update.

``job_listener(home, job_id, policy, address, netns)`` adds the job's listener (the gateway
address on the job's own link, bound inside the job's namespace) to the host's gateway, starting
the gateway if none runs, and removes it when the block ends (stopping the gateway with the last
listener). Changes are serialised by a lock file beside the gateway's state, so concurrent job
runs update one gateway. The job's credentials are resolved from the home's secret store into
the gateway's root-only secret files; the guest never receives them. The helpers a listener
needs run as the gateway's own processes, started before that listener is added and stopped
with the last listener that needs them: the content classifier for ``inspect: true`` names
(``hostclassifier``) and the MCP pinning service for ``mcp:`` names (``hostpin``, in the uplink
namespace; its config rewritten from the rendering on every listener change).

What the guest gets (``JobListener.guest_files`` / ``guest_env``): a hosts file mapping only its
listed names to the gateway address, ``hosts: files`` resolution, and a trust bundle with the
egress CA. Wildcard entries cannot be resolved through a hosts file: a Tier-2 guest reaches
exact names only (the gateway would accept them, but the guest has no name to dial).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import signal
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from controlplane._internal.fs import write_atomic
from controlplane.boundary import envoy, events, hostclassifier, hostpin
from controlplane.boundary.ca import SYSTEM_BUNDLE, EgressCA
from controlplane.boundary.contentgate import Classifier
from controlplane.boundary.gateway import Gateway, Reload
from controlplane.boundary.hostproc import alive
from controlplane.boundary.policy import EgressPolicy
from controlplane.boundary.render import GatewaySpec, Listener, render
from controlplane.governance import secrets as secret_store
from controlplane.home import Home

GUEST_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_RUNNING: dict[Path, Gateway] = {}  # gateways this process started (so it reaps what it stops)


@dataclasses.dataclass(frozen=True)
class HostGatewayOptions:
    """``root``: the gateway's directory (default ``<home>/run/egress-gateway``); ``netns``: run
    Envoy in that namespace (tests: where their upstream is); ``upstreams``: pinned resolutions;
    ``trusted_ca``: what upstream servers are verified against (default the system store)."""

    root: Path | None = None
    netns: str | None = None
    upstreams: Mapping[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    trusted_ca: Path = SYSTEM_BUNDLE


@dataclasses.dataclass
class JobListener:
    identity: str
    address: ipaddress.IPv4Address
    policy: EgressPolicy
    ca: EgressCA
    gateway: Gateway
    generation: str  # the whole gateway's generation once this listener was in force
    started_gateway: bool  # this job started the gateway (no other job was running)
    seconds: float  # from the request to the listener in force (start or hot reload)
    log_offset: int  # where this job's access-log lines begin

    @property
    def guest_files(self) -> dict[str, bytes]:
        """Files under the guest's /etc: its names resolve to the gateway, nothing else resolves."""
        names = sorted({r.host for r in self.policy.names if not r.wildcard})
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.address} {n}\n" for n in names)
        return {
            "hosts": hosts.encode(),
            "nsswitch.conf": b"hosts: files\n",
            GUEST_BUNDLE.removeprefix("/etc/"): self.ca.bundle(),
            "ssl/certs/avm-egress-ca.pem": self.ca.cert_path.read_bytes(),
        }

    @property
    def guest_env(self) -> dict[str, str]:
        return {
            "SSL_CERT_FILE": GUEST_BUNDLE,
            "REQUESTS_CA_BUNDLE": GUEST_BUNDLE,
            "NODE_EXTRA_CA_CERTS": "/etc/ssl/certs/avm-egress-ca.pem",
        }

    def requests_completed(self) -> int:
        """Requests the gateway completed on this job's listener (admin stats, per listener)."""
        total = 0
        for port in self.policy.ports:
            prefix = re.escape(f"listener.{self.address}_{port}.http.")
            stats = self.gateway.admin.stats(urllib.parse.quote(f"^{prefix}.*\\.downstream_rq_completed$"))
            total += sum(int(v) for v in stats.values())
        return total

    def events(self, timeout: float = 5.0) -> list[events.Event]:
        """This job's ``egress.allowed`` / ``egress.denied`` events: as many as the gateway counted
        completed requests on its listener (the access log is flushed on an interval)."""
        want = self.requests_completed()
        log = self.gateway.access_log
        return events.read(log, identity=self.identity, timeout=timeout, want=want, offset=self.log_offset)

    def evidence(self) -> dict[str, Any]:
        """What the job's receipt records (never a secret value)."""
        binary = envoy.binary()
        return {
            "envoy_version": binary.version,
            "envoy_sha256": binary.sha256,
            "identity": self.identity,
            "listener": f"{self.address}:{','.join(map(str, self.policy.ports))}",
            "policy_generation": self.policy.generation,
            "gateway_generation": self.generation,
            "egress_ca": self.ca.fingerprint,
            "started_gateway": self.started_gateway,
            "listener_in_force_s": round(self.seconds, 4),
        }


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(root / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _state(root: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((root / "state.json").read_text())
        return doc
    except FileNotFoundError:
        return {"pid": None, "listeners": {}}


def _spec(
    home: Home, root: Path, gw: Gateway, ca: EgressCA, state: dict[str, Any], opts: HostGatewayOptions
) -> GatewaySpec:
    listeners = tuple(
        Listener(
            ident,
            ipaddress.IPv4Address(x["address"]),
            EgressPolicy.model_validate(x["policy"]),
            Path(x["netns"]),
        )
        for ident, x in sorted(state["listeners"].items())
    )
    rules = [r for x in listeners for r in x.policy.names]
    refs = sorted({r.credential.ref for r in rules if r.credential})
    paths = {ref: gw.put_secret(ref, secret_store.resolve(home, ref)) for ref in refs}
    inspects = any(r.inspect for r in rules)
    pin = state.get("mcp_pin")
    return GatewaySpec(
        listeners=listeners,
        **gw.paths(),
        trusted_ca=opts.trusted_ca,
        leaves={r.host: ca.leaf(r.host) for r in rules},
        secrets=paths,
        upstreams=dict(opts.upstreams),
        uplink_netns=Path(f"/run/netns/{opts.netns}") if opts.netns else Path("/proc/1/ns/net"),
        classifier=Classifier(hostclassifier.socket_path(root)) if inspects else None,
        mcp_pin=(str(pin[0]), int(pin[1])) if pin else None,
    )


def _inspects(state: dict[str, Any]) -> bool:
    return any(r.get("inspect") for x in state["listeners"].values() for r in x["policy"]["names"])


def _mcps(state: dict[str, Any]) -> bool:
    return any(r.get("mcp") for x in state["listeners"].values() for r in x["policy"]["names"])


def _helpers(root: Path, state: dict[str, Any], opts: HostGatewayOptions) -> None:
    """Start the helpers the listeners need, before a listener that asks them is added: the
    classifier for inspected names, the pinning service (its address into ``state``) for MCP."""
    if _inspects(state):
        hostclassifier.ensure(root)
    if _mcps(state):
        state["mcp_pin"] = list(hostpin.address(root, opts.netns))
    else:
        state.pop("mcp_pin", None)


def _stop_unneeded(root: Path, state: dict[str, Any]) -> None:
    if not _inspects(state):
        hostclassifier.stop(root)
    if not _mcps(state):
        hostpin.stop(root)


def _update(
    home: Home, root: Path, ca: EgressCA, state: dict[str, Any], old: dict[str, Any], opts: HostGatewayOptions
) -> tuple[Gateway, Reload, bool]:
    gw = _RUNNING.get(root) or Gateway(root, netns=opts.netns)
    if not state["listeners"]:
        _stop(root, gw, state.get("pid"))
        state.pop("mcp_pin", None)
        _stop_unneeded(root, state)
        return gw, Reload(gw.rendered.generation if gw.rendered else "", "", 0.0), False
    try:
        _helpers(root, state, opts)
        spec = _spec(home, root, gw, ca, state, opts)
        if spec.mcp_pin is not None:  # the pins of every MCP listener, before Envoy routes to them
            pins = render(spec).mcp_pin
            assert pins is not None
            hostpin.write(root, pins)
        if alive(state.get("pid")) and gw.admin.ready():
            if gw.rendered is None:
                gw.rendered = render(_spec(home, root, gw, ca, old, opts))
            reload, started = gw.apply(spec), False
        else:
            start = time.monotonic()
            in_force = gw.start(spec)
            _RUNNING[root] = gw
            state["pid"] = gw.process.pid
            reload, started = Reload("", in_force.lds, time.monotonic() - start), True
    except BaseException:
        if not alive(old.get("pid")):  # refused: leave the helpers as they were
            _stop_unneeded(root, {"listeners": {}})
        else:
            _stop_unneeded(root, old)
        raise
    _stop_unneeded(root, state)  # after the last listener that needed one went
    return gw, reload, started


def _stop(root: Path, gw: Gateway, pid: int | None) -> None:
    if root in _RUNNING:
        _RUNNING.pop(root).stop()
    elif alive(pid):
        assert pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        envoy.wait_until(lambda: not alive(pid), 10.0, 0.05)


def _save(root: Path, state: dict[str, Any]) -> None:
    """Record the state, and remove every secret file no listener in it needs any more (after
    the update that stopped using it is in force): no credential stays on disk for nothing."""
    write_atomic(root / "state.json", json.dumps(state, sort_keys=True).encode(), 0o600)
    keep = {
        str(c["ref"]).rsplit("/", 1)[1]
        for x in state["listeners"].values()
        for r in x["policy"]["names"]
        if (c := r.get("credential"))
    }
    for stale in (root / "secrets").glob("*") if (root / "secrets").is_dir() else ():
        if stale.name not in keep:
            stale.unlink()


@contextlib.contextmanager
def job_listener(
    home: Home,
    job_id: str,
    policy: EgressPolicy,
    address: ipaddress.IPv4Address,
    netns: str,
    options: HostGatewayOptions | None = None,
) -> Iterator[JobListener]:
    """Serve ``policy`` for job ``job_id`` on ``address`` inside ``netns`` for the block.

    Raises what ``Gateway.start``/``apply`` raise (``gateway-config-invalid``,
    ``gateway-start-failed``, ``gateway-reload-rejected``) and ``secret-unresolved`` for a
    credential the home does not hold, all before the guest starts; the gateway is left as it was.
    """
    opts = options or HostGatewayOptions()
    root = opts.root or home.run / "egress-gateway"
    identity = f"job:{job_id}"
    with _locked(root):
        ca = EgressCA.ensure(root / "ca")
        old = _state(root)
        if old.get("listeners") and not alive(old.get("pid")):
            old = {"pid": None, "listeners": {}}  # a crashed gateway's listeners are gone with it
        entry = {
            "address": str(address),
            "netns": f"/run/netns/{netns}",
            "policy": policy.model_dump(mode="json"),
        }
        state = {"pid": old.get("pid"), "listeners": {**old["listeners"], identity: entry}}
        gw, reload, started = _update(home, root, ca, state, old, opts)
        _save(root, state)
        offset = gw.access_log.stat().st_size if gw.access_log.exists() else 0
    try:
        yield JobListener(identity, address, policy, ca, gw, reload.after, started, reload.seconds, offset)
    finally:
        with _locked(root):
            before = _state(root)
            after = {
                "pid": before.get("pid"),
                "listeners": {k: v for k, v in before["listeners"].items() if k != identity},
            }
            _update(home, root, ca, after, before, opts)
            if not after["listeners"]:
                after["pid"] = None
            _save(root, after)
