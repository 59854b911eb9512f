"""Connectivity probes run from inside a namespace: the evidence that a ruleset does what it says.

One ``python3`` process runs in the namespace (``ip netns exec NS python3 -c ...``) and tries
every target in turn with a short timeout, so a probe set costs one round trip. A target is
``(host, port, proto)`` with proto ``tcp``, ``udp`` (send a datagram, wait for any answer) or
``icmp`` (one echo request; port ignored). IPv6 hosts are probed over IPv6.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from controlplane import hostscripts
from controlplane._internal.netns import in_netns
from controlplane.errors import OperationalError
from controlplane.transport.base import Transport
from controlplane.transport.local import LocalTransport

_PROBE = hostscripts.text("net_probe")


def probe_targets(
    netns: str,
    targets: Sequence[tuple[str, int, str]],
    *,
    timeout: float = 1.0,
    host: Transport | None = None,
    python: str = "/usr/bin/python3",
) -> list[dict[str, Any]]:
    """Probe ``targets`` from inside ``netns``; one dict per target, in order.

    Each dict has ``reached`` (a TCP connect, or any UDP/ICMP answer, within ``timeout``),
    ``answer`` (the first bytes the server sent), ``error`` and ``elapsed_s``. Raises
    ``OperationalError('probe-failed')`` if the probe process itself fails. ``python`` is an
    absolute path on purpose: a PATH shim (pyenv) costs most of a second per probe.
    """
    transport = host or LocalTransport()
    argv = in_netns(
        netns, [python, "-I", "-S", "-c", _PROBE, json.dumps([list(t) for t in targets]), str(timeout)]
    )
    result = transport.run(argv, timeout=30.0 + timeout * 4 * len(targets))
    try:
        data = json.loads(result.stdout)
    except ValueError:
        data = None
    if not result.ok or not isinstance(data, list):
        raise OperationalError(
            "probe-failed",
            f"probe in {netns} exited {result.rc}: {result.stderr.strip()[-400:]}",
            hint="is python3 installed on the host, and does the namespace exist?",
        )
    return [d for d in data if isinstance(d, dict)]
