"""Connectivity probes, run inside a network namespace as ``python3 -I -S -c <this file> TARGETS TIMEOUT``.

``TARGETS`` is JSON ``[[host, port, proto], ...]`` with proto ``tcp``, ``udp`` (send a datagram,
wait for any answer) or ``icmp`` (one echo request; port ignored); IPv6 hosts are probed over
IPv6. Prints one JSON list, one object per target in order: ``reached``, ``answer``, ``error``,
``elapsed_s``. Runs with ``-S`` (no site), so the standard library only.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from typing import Any


def probe(host: str, port: int, proto: str, timeout: float) -> str:
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
                raise OSError(f"icmp unreachable code {data[(data[0] & 15) * 4 + 1]}")
        raise TimeoutError("timed out")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(fam, kind) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        if proto == "udp":
            s.send(b"avm-probe")
        return s.recv(64).decode("utf-8", "replace")


def main() -> None:
    targets, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
    out: list[dict[str, Any]] = []
    for host, port, proto in targets:
        start = time.monotonic()
        try:
            answer, error = probe(host, port, proto, timeout), ""
        except Exception as exc:
            answer, error = "", f"{type(exc).__name__}: {exc}"
        out.append(
            {
                "host": host,
                "port": port,
                "proto": proto,
                "reached": not error,
                "answer": answer,
                "error": error,
                "elapsed_s": round(time.monotonic() - start, 4),
            }
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
