"""A minimal QMP client (QEMU's JSON control socket): enough to stop, save, restore and resume.

One connection per use, as a context manager. Events that arrive between a command and its
reply are skipped. Raises ``OperationalError('qmp-failed')`` with the command and QEMU's
error when a command fails or the socket does not answer in time.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from controlplane.errors import OperationalError


class Qmp:
    def __init__(self, path: Path, *, connect_s: float = 10.0, timeout_s: float = 30.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        end = time.monotonic() + connect_s
        while True:  # QEMU creates the socket a moment after it starts
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > end:
                    self._sock.close()
                    raise OperationalError(
                        "qmp-failed", f"no QMP socket at {path} after {connect_s:g}s", hint="see qemu.log"
                    ) from exc
                time.sleep(0.01)
        self._sock.settimeout(timeout_s)
        self._reader = self._sock.makefile("rb")
        self._line()  # greeting
        self.execute("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        try:
            raw = self._reader.readline()
        except OSError as exc:
            raise OperationalError("qmp-failed", f"QMP at {self.path}: {exc}") from exc
        if not raw:
            raise OperationalError(
                "qmp-failed", f"QMP at {self.path} closed (QEMU exited?)", hint="see qemu.log"
            )
        doc: dict[str, Any] = json.loads(raw)
        return doc

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._line()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise OperationalError(
                    "qmp-failed",
                    f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}",
                    details={"command": command, "error": reply["error"]},
                )

    def wait_status(self, wanted: str, *, timeout_s: float, poll_s: float = 0.01) -> None:
        """Poll ``query-status`` until the run state is ``wanted``; raises ``qmp-failed`` on timeout."""
        end = time.monotonic() + timeout_s
        status = ""
        while time.monotonic() < end:
            status = self.execute("query-status")["status"]
            if status == wanted:
                return
            time.sleep(poll_s)
        raise OperationalError(
            "qmp-failed",
            f"QEMU did not reach run state {wanted!r} within {timeout_s:g}s",
            details={"expected": wanted, "actual": status},
        )

    def wait_migration(self, *, timeout_s: float) -> dict[str, Any]:
        """Poll ``query-migrate`` until it completes; raises ``qmp-failed`` if it fails or hangs."""
        end = time.monotonic() + timeout_s
        info: dict[str, Any] = {}
        while time.monotonic() < end:
            info = self.execute("query-migrate")
            if info.get("status") == "completed":
                return info
            if info.get("status") in ("failed", "cancelled"):
                break
            time.sleep(0.02)
        why = f"{info.get('status')} {info.get('error-desc', '')}".strip()
        raise OperationalError(
            "qmp-failed",
            f"saving the VM state did not complete: {why}",
            details={"expected": "completed", "actual": info},
        )

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
