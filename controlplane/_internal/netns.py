"""``ip``, ``nft``, ``lsns`` and ``kill``, wrapped once: network namespaces, links and rulesets.

Every call goes through a ``Transport`` as an argv list (``ip -n NS ...``, ``ip netns exec NS
nft ...``), so the same code works locally and on a golden VM over SSH. Facts are parsed from
JSON output (``ip -j``, ``nft -j``, ``lsns -J``); nothing here decides policy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from controlplane.errors import OperationalError, UsageError
from controlplane.transport.base import RunResult, Transport

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.:/@+=-]+$")  # what `ip -batch` lines may carry, unquoted


class Ip:
    """``ip`` in one namespace (``netns=None``: the transport's own namespace)."""

    def __init__(self, host: Transport, netns: str | None = None) -> None:
        self.host = host
        self.netns = netns

    def argv(self, *args: str) -> list[str]:
        return ["ip", *(("-n", self.netns) if self.netns else ()), *args]

    def run(self, *args: str, check: bool = True, timeout: float = 15.0) -> RunResult:
        """Run ``ip [-n NS] ARGS``. Raises ``CommandFailed`` when ``check`` and rc != 0."""
        result = self.host.run(self.argv(*args), timeout=timeout)
        return result.check() if check else result

    def batch(self, lines: Sequence[Sequence[str]], timeout: float = 15.0) -> RunResult:
        """Run many ``ip`` commands in one process (``ip -batch -``); stops at the first failure.

        Raises ``UsageError('ip-batch-token')`` for a token ``ip -batch`` would split or
        interpret, and ``CommandFailed`` when a command fails.
        """
        for line in lines:
            for token in line:
                if not _TOKEN_RE.fullmatch(token):
                    raise UsageError(
                        "ip-batch-token",
                        f"ip batch token {token!r} is not plain: expected {_TOKEN_RE.pattern}",
                        hint="names and addresses are validated before this point; this is a bug",
                    )
        text = "".join(" ".join(line) + "\n" for line in lines)
        return self.host.run(self.argv("-batch", "-"), stdin=text.encode(), timeout=timeout).check()

    def json(self, *args: str) -> list[dict[str, Any]]:
        """``ip -j ARGS`` parsed; an empty output is an empty list."""
        out = self.run("-j", *args).stdout.strip()
        data = json.loads(out) if out else []
        return [d for d in data if isinstance(d, dict)]

    def links(self) -> list[dict[str, Any]]:
        return self.json("link", "show")

    def ipv4_addrs(self) -> list[tuple[str, int]]:
        """(address, prefixlen) of every IPv4 address in the namespace."""
        return [
            (str(a["local"]), int(a["prefixlen"]))
            for link in self.json("-4", "addr", "show")
            for a in link.get("addr_info", [])
            if a.get("family") == "inet"
        ]

    def ipv4_routes(self) -> list[str]:
        """Destinations of the IPv4 main table (``default`` excluded)."""
        return [
            str(r["dst"]) for r in self.json("-4", "route", "show") if r.get("dst") not in (None, "default")
        ]


def netns_names(host: Transport) -> list[str]:
    """Names of the namespaces mounted under /run/netns."""
    return [str(n["name"]) for n in Ip(host).json("netns", "list")]


def netns_pids(host: Transport, netns: str) -> list[int]:
    """Processes running inside ``netns`` (empty if it does not exist)."""
    result = host.run(["ip", "netns", "pids", netns], timeout=10.0)
    return [int(p) for p in result.stdout.split() if p.isdigit()] if result.ok else []


def netns_inode(host: Transport, netns: str) -> int | None:
    """The namespace's inode (its identity while any process or mount holds it), or None."""
    result = host.run(["stat", "-L", "-c", "%i", f"/run/netns/{netns}"], timeout=10.0)
    return int(result.stdout.strip()) if result.ok and result.stdout.strip().isdigit() else None


def held_net_inodes(host: Transport) -> set[int]:
    """Inodes of every network namespace some process is in (``lsns -t net``).

    Raises ``OperationalError('lsns-failed')`` if util-linux ``lsns`` cannot list them.
    """
    result = host.run(["lsns", "-t", "net", "-J", "-o", "NS"], timeout=10.0)
    if not result.ok:
        raise OperationalError("lsns-failed", f"lsns -t net failed: {result.stderr.strip()}")
    return {int(n["ns"]) for n in json.loads(result.stdout).get("namespaces", [])}


def kill_all(host: Transport, pids: Sequence[int]) -> None:
    """SIGKILL ``pids`` (processes left in a job's namespace belong to the job)."""
    if pids:
        host.run(["kill", "-KILL", *[str(p) for p in pids]], timeout=10.0)


def delete_netns(host: Transport, netns: str) -> bool:
    """Kill what runs in ``netns`` and unmount it. Returns whether it existed."""
    kill_all(host, netns_pids(host, netns))
    return host.run(["ip", "netns", "del", netns], timeout=15.0).ok


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """argv that runs ``argv`` inside ``netns``."""
    return ["ip", "netns", "exec", netns, *argv]


def nft(host: Transport, netns: str, args: Sequence[str], *, script: str | None = None) -> RunResult:
    """``nft ARGS`` inside ``netns`` (a script on stdin with ``-f -``). Raises ``CommandFailed``."""
    stdin = script.encode() if script is not None else None
    return host.run(in_netns(netns, ["nft", *args]), stdin=stdin, timeout=15.0).check(
        hint="check the rendered ruleset without applying it: `nft -c -f -` reads it on stdin"
    )


def nft_json(host: Transport, netns: str, *args: str) -> dict[str, Any]:
    """``nft -j ARGS`` inside ``netns``, parsed. Raises ``CommandFailed`` if nft fails."""
    data = json.loads(nft(host, netns, ["-j", *args]).stdout or "{}")
    return data if isinstance(data, dict) else {}


def host_tables(host: Transport) -> list[str]:
    """Names of the nftables tables in the transport's own namespace."""
    result = host.run(["nft", "-j", "list", "tables"], timeout=10.0).check()
    return [
        str(i["table"]["name"]) for i in json.loads(result.stdout or "{}").get("nftables", []) if "table" in i
    ]


def sysctl(host: Transport, netns: str | None, settings: Sequence[str]) -> None:
    """``sysctl -q -w KEY=VALUE...`` (inside ``netns`` when given). Raises ``CommandFailed``."""
    argv = ["sysctl", "-q", "-w", *settings]
    host.run(in_netns(netns, argv) if netns else argv, timeout=10.0).check()
