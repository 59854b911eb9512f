"""Controls observed in force, not assumed from configuration: egress deny and resource limits.

A unit file that says ``IPAddressDeny=any`` or ``MemoryMax=`` proves nothing by itself: inside
an nspawn golden host on a hybrid-cgroup machine neither is enforced (a process under
``MemoryMax=50M`` allocated 300 MiB, one under ``IPAddressDeny=any`` connected out). So after
every restart (promote) and at every ``avm status``, avm runs ``probe_argv`` on the host (the
program is ``hostscripts/sandbox_probe.py``) and ``parse``s what it saw:

- egress: a process in the unit's network namespace and cgroups, as the unit's user, connects
  to a listener the probe opened on the host's own non-loopback address (in no allowlist),
  while the probe's own connection from outside the sandbox is the control. ``denied`` only
  when the sandboxed connection was refused or dropped and the control got through;
- limits: the kernel's own files for the unit's cgroups against systemd's configured values;
  ``not-enforced`` whenever the kernel applies a different limit or none.

``parse`` and ``findings`` are pure. Where the backend needs a host-side mechanism (nspawn:
``controlplane.vm.nspawnnet``), ``install_host_side`` is the one seam promotion calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from controlplane import hostscripts
from controlplane._internal.loading import Frozen
from controlplane.errors import OperationalError
from controlplane.promote.layout import LAYOUT

if TYPE_CHECKING:
    from controlplane.evidence.step import Step
    from controlplane.promote.drift import Finding
    from controlplane.promote.facts import Then
    from controlplane.promote.material import Material
    from controlplane.transport.base import Transport
    from controlplane.transport.inventory import Target
    from controlplane.vm.nspawnnet import VmNet

PROBE_TIMEOUT_S = 3.0
# errnos of a refused or filtered connect: EPERM (cgroup-BPF), EACCES, ENETUNREACH, EHOSTUNREACH (reject)
_DENIED_ERRNOS = {1, 13, 101, 113}
_UNLIMITED = 2**62  # v1 memory.limit_in_bytes "no limit" is 9223372036854771712
EgressVerdict = Literal["denied", "allowed", "inconclusive"]
LimitStatus = Literal["enforced", "not-enforced", "not-configured"]


class LimitReading(Frozen):
    configured: str | None  # what systemd was told (systemctl show)
    kernel: str | None  # what the cgroup file says (None: no such file for the unit)
    file: str
    status: LimitStatus


class Observed(Frozen):
    """What the probe saw for one profile."""

    profile: str
    egress: EgressVerdict
    egress_detail: str
    limits: Literal["enforced", "not-enforced", "inconclusive"]
    limit_readings: dict[str, LimitReading]

    def summary(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"profile"})


def probe_argv(profiles: Sequence[str], *, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """The one command that probes every profile's sandbox (run as root on the host)."""
    request = {"profiles": sorted(profiles), "timeout": timeout_s}
    return ["python3", "-c", hostscripts.text("sandbox_probe"), json.dumps(request, sort_keys=True)]


def _timespan_us(value: str) -> float | None:
    """systemd's ``250ms`` / ``1.500000s`` / ``1min`` as microseconds; None for infinity."""
    units = {"us": 1.0, "ms": 1e3, "s": 1e6, "min": 6e7}
    total, found = 0.0, False
    for number, unit in re.findall(r"([0-9.]+)(us|ms|min|s)", value):
        total += float(number) * units[unit]
        found = True
    return total if found else None


def _number(value: str | None) -> int | None:
    if value is None or not value.lstrip("-").isdigit():
        return None
    number = int(value)
    return None if number < 0 or number >= _UNLIMITED else number


def _limit(kind: str, configured: str | None, reading: Mapping[str, Any]) -> LimitReading:
    kernel, file = reading.get("value"), str(reading.get("file", ""))
    if kind == "cpu":
        want = _timespan_us(configured or "")
        parts = (kernel or "").split()
        quota = _number(parts[0]) if len(parts) == 2 else None
        period = _number(parts[1]) if len(parts) == 2 else None
        have = quota * 1e6 / period if quota is not None and period else None
        ok = want is not None and have is not None and abs(have - want) <= want * 0.01
    else:
        want_n, have_n = _number(configured), _number(kernel)
        want = float(want_n) if want_n is not None else None
        # memory.max is rounded down to a page by the kernel
        slack = 4096 if kind == "memory" else 0
        ok = want_n is not None and have_n is not None and 0 <= want_n - have_n <= slack
    status: LimitStatus = "not-configured" if want is None else ("enforced" if ok else "not-enforced")
    return LimitReading(configured=configured, kernel=kernel, file=file, status=status)


def _egress(doc: Mapping[str, Any]) -> tuple[EgressVerdict, str]:
    if "error" in doc:
        return "inconclusive", str(doc["error"])
    dest, control = doc.get("destination", "?"), doc.get("control")
    if control != "connected":
        return "inconclusive", f"the probe's own connection to {dest} failed ({control}): nothing was shown"
    child = doc.get("sandboxed") or {}
    if "error" in child:
        return "inconclusive", f"the sandboxed probe could not run: {child['error']}"
    who = f"uid {child.get('uid')} in cgroups {','.join(child.get('joined', []))}"
    outcome = str(child.get("result"))
    if outcome == "connected":
        return "allowed", f"{who} connected to {dest} (in no allowlist)"
    match = re.match(r"errno (\d+)", outcome)
    if outcome == "timeout":
        return "denied", f"{who}: connect to {dest} dropped (timeout); from outside the sandbox it connected"
    if match and int(match.group(1)) in _DENIED_ERRNOS:
        return (
            "denied",
            f"{who}: connect to {dest} refused ({outcome}); from outside the sandbox it connected",
        )
    return "inconclusive", f"{who}: connect to {dest} gave {outcome}, neither a refusal nor a connection"


def parse(stdout: str) -> dict[str, Observed]:
    """The probe's output, judged per profile. Pure.

    Raises ``OperationalError('probe-unparseable')`` when the output is not the probe's JSON.
    """
    try:
        doc = json.loads(stdout)
        profiles = doc["profiles"]
        assert isinstance(profiles, dict)
    except (ValueError, KeyError, AssertionError) as exc:
        raise OperationalError(
            "probe-unparseable",
            f"the sandbox probe's output could not be parsed: {exc}",
            hint="the host may lack python3 or iproute2; nothing was changed",
            details={"stdout_head": stdout[:500]},
        ) from exc
    out: dict[str, Observed] = {}
    for name, raw in sorted(profiles.items()):
        unit, readings = raw.get("unit", {}), raw.get("limits")
        egress, detail = _egress(raw)
        limits: dict[str, LimitReading] = {}
        if isinstance(readings, dict):
            limits = {
                "memory": _limit("memory", unit.get("MemoryMax"), readings.get("memory", {})),
                "tasks": _limit("tasks", unit.get("TasksMax"), readings.get("tasks", {})),
                "cpu": _limit("cpu", unit.get("CPUQuotaPerSecUSec"), readings.get("cpu", {})),
            }
        statuses = {r.status for r in limits.values()}
        overall: Literal["enforced", "not-enforced", "inconclusive"] = (
            "inconclusive" if not limits else ("not-enforced" if "not-enforced" in statuses else "enforced")
        )
        try:
            out[name] = Observed(
                profile=name, egress=egress, egress_detail=detail, limits=overall, limit_readings=limits
            )
        except ValidationError as exc:
            raise OperationalError("probe-unparseable", f"profile {name}: {exc.errors()[0]['msg']}") from exc
    return out


def probe(host: Transport, profiles: Sequence[str]) -> dict[str, Observed]:
    """Run the probe through the transport (one round trip) and parse it."""
    if not profiles:
        return {}
    # the sandboxed connections of all profiles run at once: about one timeout in all
    result = host.run(probe_argv(profiles), timeout=60 + PROBE_TIMEOUT_S * 2)
    result.check(hint="the sandbox probe failed on the host; nothing was changed")
    return parse(result.stdout)


def from_gather(then: Then | None) -> dict[str, Observed]:
    """The probe's result when it ran inside the facts gatherer's round trip
    (``facts.gather(..., then=probe_argv(...))``). Raises ``OperationalError('probe-failed')``."""
    if then is None:
        return {}
    if then.rc != 0:
        raise OperationalError(
            "probe-failed",
            f"the sandbox probe failed on the host (rc {then.rc}): {then.stderr.strip()[-300:]}",
            hint="nothing was changed; run the status again, or inspect the host",
        )
    return parse(then.stdout)


def limits_detail(obs: Observed) -> str:
    parts = []
    for kind, r in obs.limit_readings.items():
        parts.append(f"{kind} {r.status}: configured {r.configured}, kernel {r.file} = {r.kernel}")
    return "; ".join(parts) or "no cgroup of the unit could be read"


def record(step: Step, observed: Mapping[str, Observed]) -> None:
    """Every observation as checks of ``step``: ``egress-denied:P`` and ``limits:P`` (whose
    detail starts with the verdict, so a not-enforced limit never reads as ok)."""
    for name, obs in sorted(observed.items()):
        step.check(
            f"egress-denied:{name}", ok=obs.egress == "denied", detail=f"{obs.egress}: {obs.egress_detail}"
        )
        step.check(
            f"limits:{name}", ok=obs.limits == "enforced", detail=f"{obs.limits}: {limits_detail(obs)}"
        )


# --- where the backend enforces egress outside the VM (nspawn) ------------------------------


def host_network(target: Target) -> VmNet | None:
    """The private network of an nspawn VM target (None for any other backend)."""
    from controlplane.vm.nspawnnet import VmNet

    data = target.meta.get("network")
    return VmNet.from_json(data) if target.backend == "nspawn" and isinstance(data, dict) else None


def install_host_side(target: Target, host: Transport, material: Material, step: Step) -> None:
    """For an nspawn target: make each profile's user (so its uid exists), then install its
    default-deny chain into the VM's namespace from the host side. A no-op for other backends,
    whose mechanism is the unit's ``IPAddressDeny=`` (observed by the probe all the same).

    Raises ``CommandFailed`` if ``nft -c`` rejects the rendered ruleset (nothing is loaded).
    """
    from controlplane.promote import hostops
    from controlplane.transport.local import LocalTransport
    from controlplane.vm import nspawnnet

    net = host_network(target)
    if net is None:
        return
    users = {prof.name: LAYOUT.user(prof.name) for prof in material.profiles}
    uids = _uids(host, list(users.values()))
    for name, user in users.items():
        if user not in uids:  # a new profile: its user must exist before its rule can name it
            step.command(hostops.ensure_user(host, name))
    uids = _uids(host, list(users.values())) if len(uids) < len(users) else uids
    wanted = [
        nspawnnet.ProfileEgress(prof.name, uids[users[prof.name]], prof.egress) for prof in material.profiles
    ]
    with LocalTransport() as local:
        nspawnnet.install(local, net.netns, wanted)
        rules = nspawnnet.parse_rules(nspawnnet.read_rules(local, net.netns))
    for want in wanted:
        got = rules.get(want.profile, {})
        ok = got.get("uid") == want.uid and got.get("deny_rule") is True
        reject = "present" if got.get("deny_rule") else "MISSING"
        step.check(
            f"egress-rules:{want.profile}",
            ok=ok,
            detail=f"netns {net.netns} table inet {nspawnnet.TABLE}: uid {got.get('uid')}, "
            f"{len(want.allow)} allow rule(s), default reject {reject}",
        )


def host_uids(host: Transport, users: Sequence[str]) -> dict[str, int]:
    """user -> uid of those of ``users`` that exist on the host."""
    return _uids(host, users)


def _uids(host: Transport, users: Sequence[str]) -> dict[str, int]:
    """user -> uid for those of ``users`` that exist on the host (one ``getent`` round trip)."""
    result = host.run(["getent", "passwd", *users], timeout=30)  # rc 2 when one is missing
    return {
        fields[0]: int(fields[2])
        for line in result.stdout.splitlines()
        if len(fields := line.split(":")) > 2 and fields[2].isdigit()
    }


def host_side_findings(target: Target, profiles: Sequence[str]) -> tuple[list[Finding], dict[str, Any]]:
    """For an nspawn target: a finding for each profile whose host-side chain is gone or no
    longer ends in the default reject; with the counters read. Empty for other backends."""
    from controlplane.promote.drift import Finding
    from controlplane.transport.local import LocalTransport
    from controlplane.vm import nspawnnet

    net = host_network(target)
    if net is None:
        return [], {}
    with LocalTransport() as local:
        rules = nspawnnet.parse_rules(nspawnnet.read_rules(local, net.netns))
    findings = [
        Finding(
            where=f"netns {net.netns}: table inet {nspawnnet.TABLE} chain {nspawnnet.chain_name(p)}",
            what="host-side egress rules",
            expected="a uid-bound chain ending in reject",
            actual="missing"
            if p not in rules
            else f"uid {rules[p].get('uid')}, reject {rules[p].get('deny_rule')}",
        )
        for p in profiles
        if not (rules.get(p, {}).get("deny_rule") and rules.get(p, {}).get("uid") is not None)
    ]
    return findings, rules


def findings(observed: Mapping[str, Observed], recorded: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """Drift from the probe: egress not observed denied (always: every unit is default-deny),
    and limits that were enforced at the apply but are not now. Pure."""
    from controlplane.promote.drift import Finding

    out = []
    for name, obs in sorted(observed.items()):
        unit = LAYOUT.unit_name(name)
        if obs.egress != "denied":
            out.append(
                Finding(
                    where=unit,
                    what=f"egress deny not observed ({obs.egress})",
                    expected="an unlisted destination refused from the sandbox",
                    actual=obs.egress_detail,
                )
            )
        if recorded.get(name, {}).get("limits") == "enforced" and obs.limits != "enforced":
            out.append(
                Finding(
                    where=unit,
                    what="resource limits",
                    expected="enforced",
                    actual=f"{obs.limits}: {limits_detail(obs)}",
                )
            )
    return out
