"""Tier-2 jobs that reach names: the job's listener on the host's egress gateway, for one run.

A job whose spec lists ``egress.names`` gets a job network (its tap, its nftables table) where
the guest may open only the gateway's ports on its own link, plus a listener of the host's
gateway bound on that address inside the job's namespace (``controlplane.boundary.hostgw``).
``record`` puts the gateway's facts (Envoy's sha256, the policy generation in force), the
job's ``egress.denied`` / ``classifier.denied`` / ``tool.denied`` (an MCP server's refused
tool, with the tool and reason) / ``egress.allowed`` events from the gateway's access log and the job's
usage (``result.usage``: ``controlplane.boundary.usage``) in the step.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from controlplane.jobs.egress.live import JobNetwork
from controlplane.jobs.spec import JobSpec

if TYPE_CHECKING:
    from controlplane.boundary.hostgw import HostGatewayOptions, JobListener
    from controlplane.evidence import step as evidence
    from controlplane.home import Home

EVENT_LIMIT = 200


@contextlib.contextmanager
def listener(
    home: Home, spec: JobSpec, net: JobNetwork | None, options: HostGatewayOptions | None
) -> Iterator[JobListener | None]:
    """The job's listener for the block, or None when the spec lists no names."""
    if net is None or not spec.egress.names:
        yield None
        return
    from controlplane.boundary.hostgw import job_listener  # Envoy and cryptography: only when used

    address = ipaddress.IPv4Address(net.gateway)
    with job_listener(home, spec.id, spec.egress.policy, address, net.netns, options) as gw:
        yield gw


def env(gw: JobListener | None) -> dict[str, str]:
    """The trust variables the job's process gets (the egress CA's bundle); none without names."""
    return gw.guest_env if gw is not None else {}


def record(step: evidence.Step, job_id: str, gw: JobListener | None) -> None:
    """Observe the gateway's facts and add the job's gateway events (while its listener exists)."""
    if gw is None:
        return
    step.observe("egress_gateway", gw.evidence())
    seen = gw.events()
    allowed: Counter[str] = Counter(f"{e.method} {e.host}" for e in seen if e.event == "egress.allowed")
    for destination, count in sorted(allowed.items()):
        step.event(
            "egress.allowed", job=job_id, destination=destination, count=count, policy=gw.policy.generation
        )
    denials = ("egress.denied", "classifier.denied", "tool.denied")  # tool.denied: an MCP refusal, its tool
    for e in [e for e in seen if e.event in denials][:EVENT_LIMIT]:
        fields: dict[str, Any] = {k: v for k, v in e.to_dict().items() if k not in ("event", "identity", "t")}
        step.event(e.event, job=job_id, destination=f"{e.host} {e.method} {e.path}", **fields)
    from controlplane.boundary import usage

    # the job's use of the gateway (requests, denials, body bytes, the upstreams' token counts)
    step.result["usage"] = usage.report(seen)
    step.check(
        "egress-gateway-events",
        ok=len(seen) == gw.requests_completed(),
        detail=f"{len(seen)} access-log events for {gw.requests_completed()} requests the gateway completed",
    )
