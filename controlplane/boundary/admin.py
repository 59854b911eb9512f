"""Envoy's admin interface, read over its root-only Unix socket: what is actually in force.

The generation in force is never taken from a file: ``in_force`` reads the LDS and CDS
``version_text`` stats (the ``version_info`` of the last update Envoy accepted), the update
counters (a rejected update moves ``update_rejected``), and, from ``/config_dump``, the policy
generation on each active listener's metadata.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
from pathlib import Path
from typing import Any

from controlplane.errors import OperationalError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


@dataclasses.dataclass(frozen=True)
class InForce:
    """What Envoy reports: the LDS/CDS versions it accepted, its rejection counts, and
    ``listeners``: active listener name -> the policy generation on its metadata."""

    lds: str
    cds: str
    rejected: int  # lds + cds update_rejected and update_failure, since start
    listeners: dict[str, str]

    @property
    def generation(self) -> str | None:
        """The rendering's generation when LDS and CDS agree (the normal state), else None."""
        return self.lds if self.lds == self.cds and self.lds else None


class Admin:
    def __init__(self, socket_path: Path, timeout: float = 2.0) -> None:
        self.socket_path, self.timeout = socket_path, timeout

    def get(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        """Raises ``OperationalError('gateway-admin-unreachable')`` if nothing answers."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except OSError as exc:
            raise OperationalError(
                "gateway-admin-unreachable",
                f"the gateway's admin socket {self.socket_path} did not answer {path}: {exc}",
                hint="the gateway is not running (or not yet): nothing passes it while it is down",
            ) from exc
        finally:
            conn.close()

    def ready(self) -> bool:
        try:
            status, body = self.get("/ready")
        except OperationalError:
            return False
        return status == 200 and body.strip() == b"LIVE"

    def stats(self, regex: str) -> dict[str, Any]:
        _, body = self.get(f"/stats?format=json&filter={regex}")
        return {s["name"]: s["value"] for s in json.loads(body)["stats"] if "name" in s}

    def in_force(self) -> InForce:
        stats = self.stats("^(listener_manager\\.lds|cluster_manager\\.cds)\\.")
        rejected = sum(
            int(stats.get(f"{p}.{c}", 0))
            for p in ("listener_manager.lds", "cluster_manager.cds")
            for c in ("update_rejected", "update_failure")
        )
        status, body = self.get("/config_dump?resource=dynamic_listeners")
        listeners: dict[str, str] = {}
        # with no listener at all, Envoy answers 404 "dynamic_listeners not found"
        for entry in json.loads(body).get("configs", []) if status == 200 else []:
            state = entry.get("active_state")
            if state is None:  # warming or failed: not serving
                continue
            meta = state.get("listener", {}).get("metadata", {}).get("filter_metadata", {}).get("avm", {})
            listeners[entry["name"]] = str(meta.get("policy", ""))
        return InForce(
            str(stats.get("listener_manager.lds.version_text", "")),
            str(stats.get("cluster_manager.cds.version_text", "")),
            rejected,
            listeners,
        )
