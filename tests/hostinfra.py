"""A testinfra backend over avm's own pinned-key SSH transport.

testinfra's ``paramiko://`` backend accepts any host key (AutoAddPolicy/WarningPolicy), so it is
never used here. ``host(transport)`` wraps an already-open avm ``Transport`` (for nspawn and QEMU
golden hosts: ``SshTransport.from_target``, which pins the host key with ``RejectPolicy``) in a
``testinfra.host.Host``: every module (service, file, user, socket, process) runs its commands
through ``Transport.run`` as ``/bin/sh -c COMMAND``.
"""

from __future__ import annotations

from typing import Any

import testinfra.host
from testinfra.backend.base import BaseBackend, CommandResult

from controlplane.transport.base import Transport


class AvmTransportBackend(BaseBackend):  # type: ignore[misc]
    NAME = "avm"

    def __init__(self, transport: Transport, *args: Any, **kwargs: Any) -> None:
        self._transport = transport
        super().__init__(transport.url, *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        cmd = self.get_command(command, *args)
        result = self._transport.run(["/bin/sh", "-c", cmd], timeout=60)
        return self.result(result.rc, self.encode(cmd), result.stdout, result.stderr)


def host(transport: Transport) -> testinfra.host.Host:
    return testinfra.host.Host(AvmTransportBackend(transport))
