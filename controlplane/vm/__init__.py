"""Golden VMs: one backend interface (``base``), shared lifecycle, and the backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane._internal.lazy import exports

if TYPE_CHECKING:
    from controlplane.vm.lifecycle import down, ssh, status, up

__all__ = ["down", "ssh", "status", "up"]
__getattr__ = exports(
    __name__, {"up": "lifecycle", "down": "lifecycle", "status": "lifecycle", "ssh": "lifecycle"}
)
