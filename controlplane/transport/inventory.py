"""The inventory: known hosts and VMs, one JSON document each under ``$AVM_HOME/inventory``.

An entry pins the host's SSH key *before* the first connection; the SSH transport refuses any
other key. Backends keep their own runtime facts (pid, ports, state dir) in ``meta``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from controlplane._internal.loading import Frozen
from controlplane.errors import OperationalError, UsageError
from controlplane.home import Home
from controlplane.ids import VmName, parse_vm_name
from controlplane.transport.local import LocalTransport


class Target(Frozen):
    """A host the control plane can reach.

    ``url`` is ``local://`` or ``ssh://USER@HOST:PORT``. ``host_key`` is the pinned OpenSSH
    public key line (``ssh-ed25519 AAAA...``); ``identity`` is the private key file to log in with.
    """

    name: VmName
    url: str
    host_key: str | None = None
    identity: str | None = None
    backend: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


def _path(home: Home, name: str) -> Path:
    return home.inventory / f"{parse_vm_name(name)}.json"


def save(home: Home, target: Target) -> None:
    with LocalTransport() as local:
        local.put(
            json.dumps(target.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n",
            str(_path(home, target.name)),
            mode=0o600,
        )


def load(home: Home, name: str) -> Target:
    """The inventory entry for ``name``. Raises ``UsageError('unknown-target')`` if absent."""
    path = _path(home, name)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        known = ", ".join(t.name for t in list_all(home)) or "none"
        raise UsageError(
            "unknown-target",
            f"no host or VM named {name!r} in the inventory",
            hint=f"known targets: {known}; `avm vm up {name}` creates one",
            details={"expected": "a name from the inventory", "actual": name},
        ) from None
    try:
        return Target.model_validate_json(raw)
    except ValidationError as exc:
        raise OperationalError(
            "inventory-corrupt",
            f"inventory entry {path} is invalid: {exc.errors()[0]['msg']}",
            hint="remove or repair the file; avm never guesses a host key",
        ) from exc


def remove(home: Home, name: str) -> None:
    _path(home, name).unlink(missing_ok=True)


def list_all(home: Home) -> list[Target]:
    out = []
    for path in sorted(home.inventory.glob("*.json")):
        try:
            out.append(Target.model_validate_json(path.read_text()))
        except (OSError, ValidationError):
            continue
    return out
