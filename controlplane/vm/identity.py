"""The host end of the identity gate: deliver a VM's own identity after a cold boot or a restore.

The guest's ``avm-identity.service`` (``guestscripts/identity_gate.py``) waits until the host
writes this VM's identity to the ``avm.identity`` virtio-serial port (sshd runs meanwhile, on a
throwaway host key, but the host forwards no port to it before the gate's "ok"), whose host end is
a unix socket in the VM's private state dir (``identity.sock``, 0700 dir): only this host's QEMU
process can write it, nothing on the guest's network can. What is delivered, and why:

- the SSH host key (pinned in the inventory before this), the login key, the sshd drop-in and
  the hostname: a snapshot holds none of them (only the throwaway host key of the boot that made
  it, never pinned), so every copy gets its own;
- a fresh machine-id: the template's was made at its first boot and would be shared;
- 64 bytes of host entropy, credited with ``RNDADDENTROPY`` and followed by ``RNDRESEEDCRNG``:
  every copy resumes with the snapshot's kernel RNG state, and sshd's session keys come after;
- the host's wall clock: the restored guest's clock is the snapshot's.

The secret parts travel only over that socket; they are never logged or put in a receipt.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from controlplane.errors import OperationalError
from controlplane.vm.base import SshSeed

PORT_NAME = "avm.identity"
SOCKET = "identity.sock"


def qemu_args(state: Path) -> list[str]:
    """The virtio-serial port the gate talks on (its host end: ``state/identity.sock``)."""
    return [
        "-chardev",
        f"socket,id=avmid,path={state / SOCKET},server=on,wait=off",
        "-device",
        "virtio-serial-device",
        "-device",
        f"virtserialport,chardev=avmid,name={PORT_NAME}",
    ]


def message(seed: SshSeed) -> dict[str, Any]:
    """The identity message (secret: the host key's private half is in it)."""
    return {
        "op": "identity",
        "host_key": base64.b64encode(seed.host_key_private).decode(),
        "host_key_pub": seed.host_key_public + "\n",
        "authorized_keys": seed.authorized_keys,
        "sshd_dropin": seed.sshd_dropin,
        "hostname": seed.hostname,
        "machine_id": uuid.uuid4().hex,
        "entropy": os.urandom(64).hex(),
        "time_ns": time.time_ns(),
    }


class Gate:
    """One connection to a VM's gate. ``wait()`` returns once the guest says it is waiting."""

    def __init__(self, state: Path, *, timeout_s: float) -> None:
        self.path = state / SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        end = time.monotonic() + min(timeout_s, 10.0)
        while True:
            try:
                self.sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > end:
                    self.sock.close()
                    raise _failed(f"no identity socket at {self.path}", "a listening socket") from exc
                time.sleep(0.01)
        self.sock.settimeout(timeout_s)
        self.buf = b""

    def _reply(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError as exc:
                raise _failed("the guest's identity gate did not answer in time", "a reply") from exc
            if not chunk:
                raise _failed("the identity socket closed (QEMU exited?)", "a reply")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        doc: dict[str, Any] = json.loads(line)
        return doc

    def wait(self) -> None:
        """Until the gate says ``waiting`` (it repeats that each time a host connects)."""
        while self._reply().get("avm") != "waiting":
            pass

    def _ask(self, msg: dict[str, Any], answer: str) -> dict[str, Any]:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._reply()
            if reply.get("avm") == answer:
                return reply
            if reply.get("avm") == "error":
                raise _failed(f"the identity gate refused: {reply.get('detail')}", answer)

    def settle(self) -> dict[str, Any]:
        """Ask the guest to finish its boot jobs (all but sshd's) before a snapshot is saved."""
        return self._ask({"op": "settle"}, "settled")

    def deliver(self, seed: SshSeed) -> dict[str, Any]:
        """Send the identity; returns the guest's acknowledgement (machine-id, a urandom sample).

        Sent at once, without waiting for the gate's "waiting": a guest restored from a snapshot
        may still be blocked in the read it began while the snapshot's host was connected (the
        hang-up reached QEMU but not yet the guest), and then only data wakes it. A guest that saw
        the hang-up is blocked in its write instead; the connection wakes that, and the data is
        already queued for its next read."""
        return self._ask(message(seed), "ok")

    def close(self) -> None:
        self.sock.close()


def _failed(actual: str, expected: str) -> OperationalError:
    return OperationalError(
        "vm-boot-failed",
        f"identity delivery failed: {actual}",
        hint="see serial.log in the VM's state dir (the gate logs to the console)",
        details={"expected": expected, "actual": actual},
    )
