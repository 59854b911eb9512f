"""The avm home directory: everything stateful lives under one root.

Layout (``--home``, else ``$AVM_HOME``, else ``~/.avm``)::

    keys/         signing keys (private keys 0600) and trusted public keys
    receipts/     the hash-chained evidence receipts
    inventory/    one JSON document per known host or VM (URL, pinned host key)
    cache/        content-addressed build outputs (images, kernels)
    run/          runtime state of VMs and jobs (overlays, sockets, logs)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from controlplane.errors import OperationalError

SUBDIRS = ("keys", "receipts", "inventory", "cache", "run")


def default_home() -> Path:
    env = os.environ.get("AVM_HOME")
    return Path(env) if env else Path.home() / ".avm"


@dataclasses.dataclass(frozen=True)
class Home:
    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def receipts(self) -> Path:
        return self.root / "receipts"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def ensure(self) -> Home:
        """Create the layout (0700: it holds keys and evidence). Idempotent."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in SUBDIRS:
                (self.root / name).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise OperationalError(
                "home-unwritable",
                f"cannot create the avm home at {self.root}: {exc.strerror}",
                hint="pass --home DIR or set AVM_HOME to a writable directory",
                details={"path": str(self.root)},
            ) from exc
        return self
