"""`avm job probe-egress`: try every egress class from inside a real guest, record what happened.

The guest is the job's own image, booted exactly as ``job run`` boots it (same network, same
rules). Before the job, the guest's init runs the probe script as root (ICMP needs a raw socket)
and writes the outcomes into the result it sends on the result port. A class is as expected
when every deny class was denied and every allowed destination was reached.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

from controlplane.evidence import step as evidence
from controlplane.home import Home
from controlplane.jobs.result import GuestResult
from controlplane.jobs.runner import run_job
from controlplane.jobs.spec import JobSpec

UNLISTED = ("198.51.100.20", 80)  # TEST-NET-2: never routed anywhere real
DNS_UNLISTED = "198.51.100.53"
METADATA = ("169.254.169.254", 80)
IPV6 = ("2001:db8::1", 80)
B = "/.avm/bin/busybox"


@dataclasses.dataclass(frozen=True)
class ProbeRow:
    klass: str
    target: str
    expected: str  # reached | denied
    observed: str  # reached | denied
    detail: str

    @property
    def as_expected(self) -> bool:
        return self.expected == self.observed


@dataclasses.dataclass
class ProbeReport:
    rows: list[ProbeRow]
    receipt_id: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.as_expected for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        rows = [{**dataclasses.asdict(r), "as_expected": r.as_expected} for r in self.rows]
        return {"ok": self.ok, "rows": rows, "receipt_id": self.receipt_id}


def probe_plan(
    spec: JobSpec, guest_env: dict[str, str], unlisted: list[tuple[str, int]]
) -> list[tuple[str, ...]]:
    """(class, target, expected, argv...) for every probe. Pure."""
    tcp = [r for r in spec.egress.allow if r.proto == "tcp"]
    allowed_ports = {r.port for r in spec.egress.allow}
    gw = guest_env.get("AVM_NET_GW", "10.0.2.2")
    plan: list[tuple[str, ...]] = []

    def nc(klass: str, host: str, port: int, expected: str) -> None:
        plan.append(
            (klass, f"{host}:{port}/tcp", expected, B, "timeout", "6", B, "nc", "-w", "3", host, str(port))
        )

    for r in spec.egress.allow:
        if r.proto == "tcp":
            nc("allowed", r.host.split("/")[0], r.port, "reached")
        elif r.port == 53:
            dns = r.host.split("/")[0]
            plan.append(
                ("allowed", f"{dns}:53/udp", "reached", B, "timeout", "6", B, "nslookup", "avm.test", dns)
            )
    for host, port in [*unlisted, UNLISTED]:
        nc("unlisted-server", host, port, "denied")
    for port in sorted(allowed_ports | {22}):
        nc("host-side", gw, port, "denied")
    if tcp:
        wrong = next(p for p in range(tcp[0].port + 1, 65536) if p not in allowed_ports)
        nc("listed-host-wrong-port", tcp[0].host.split("/")[0], wrong, "denied")
    plan.append(
        (
            "dns",
            f"{DNS_UNLISTED}:53/udp",
            "denied",
            B,
            "timeout",
            "6",
            B,
            "nslookup",
            "avm.test",
            DNS_UNLISTED,
        )
    )
    nc("metadata", *METADATA, "denied")
    icmp = tcp[0].host.split("/")[0] if tcp else UNLISTED[0]
    plan.append(("icmp", f"{icmp}/icmp", "denied", B, "timeout", "6", B, "ping", "-c", "1", "-W", "3", icmp))
    plan.append(
        (
            "ipv6",
            f"[{IPV6[0]}]:{IPV6[1]}/tcp",
            "denied",
            B,
            "timeout",
            "6",
            B,
            "nc",
            "-w",
            "3",
            *map(str, IPV6),
        )
    )
    return plan


def probe_script(plan: list[tuple[str, ...]]) -> str:
    lines = ["cd /"]
    for klass, target, expected, *argv in plan:
        head = shlex.join([klass, target, expected])
        lines.append(f"out=$({shlex.join(argv)} 2>&1 </dev/null); rc=$?")
        lines.append(
            f'printf "%s|%s\\n" {shlex.quote(head)} "$rc|$(echo "$out" | tr "\\n|" "  " | cut -c1-160)"'
        )
    return "\n".join(lines) + "\n"


def parse_rows(text: str) -> list[ProbeRow]:
    rows = []
    for line in text.splitlines():
        head, sep, rest = line.partition("|")
        rc, _, detail = rest.partition("|")
        parts = head.split(" ")
        if not sep or len(parts) != 3 or not rc.strip().isdigit():
            continue
        observed = "reached" if int(rc) == 0 else "denied"
        rows.append(ProbeRow(parts[0], parts[1], parts[2], observed, f"rc={rc} {detail.strip()}"))
    return rows


def probe_egress(
    home: Home,
    spec: JobSpec,
    *,
    spec_dir: Path,
    kernel: str = "golden",
    unlisted: list[tuple[str, int]] | None = None,
    network_options: dict[str, Any] | None = None,
) -> ProbeReport:
    """Boot the job's guest with its egress rules and probe every class. Writes a
    ``job-probe-egress`` receipt with each row, the nft counters and the teardown checks."""
    report = ProbeReport(rows=[])

    def record(step: evidence.Step, res: GuestResult) -> None:
        report.rows = parse_rows(res.probes)
        step.observe("probes", [dataclasses.asdict(r) for r in report.rows])
        for r in report.rows:
            step.check(
                f"probe-{r.klass}-{r.target}", ok=r.as_expected, detail=f"expected {r.expected}: {r.detail}"
            )
        step.result["probes_as_expected"] = report.ok

    probe_spec = spec.model_copy(update={"command": ("true",), "outputs": ()})
    result = run_job(
        home, probe_spec, spec_dir=spec_dir, kernel=kernel, kind="job-probe-egress",
        network_options=network_options, on_result=record,
        probe_script=lambda env: probe_script(probe_plan(spec, env, list(unlisted or []))),
    )  # fmt: skip
    report.receipt_id = result.receipt_id
    return report
