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

from controlplane.errors import OperationalError
from controlplane.netns import in_netns
from controlplane.transport.base import Transport
from controlplane.transport.local import LocalTransport

_PROBE = r"""
import json, socket, struct, sys, time
targets, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
def probe(host, port, proto):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    if proto == "icmp":
        s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.settimeout(timeout)
        body = struct.pack("!BBHHH", 8, 0, 0, 0x4156, 1) + b"avm!"
        total = sum(struct.unpack("!6H", body))
        total = (total >> 16) + (total & 0xFFFF)
        csum = ~(total + (total >> 16)) & 0xFFFF
        s.sendto(body[:2] + struct.pack("!H", csum) + body[4:], (host, 0))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            data, src = s.recvfrom(2048)
            kind = data[(data[0] & 15) * 4]
            if src[0] == host and kind == 0:
                return "reply"
            if kind == 3:
                raise OSError("icmp unreachable code %d" % data[(data[0] & 15) * 4 + 1])
        raise TimeoutError("timed out")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(fam, kind) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        if proto == "udp":
            s.send(b"avm-probe")
        return s.recv(64).decode("utf-8", "replace")
out = []
for host, port, proto in targets:
    start = time.monotonic()
    try:
        answer, error = probe(host, port, proto), ""
    except Exception as exc:
        answer, error = "", "%s: %s" % (type(exc).__name__, exc)
    out.append({"host": host, "port": port, "proto": proto, "reached": not error, "answer": answer,
                "error": error, "elapsed_s": round(time.monotonic() - start, 4)})
print(json.dumps(out))
"""


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
