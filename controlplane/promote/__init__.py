"""Tier-1 promotion: resolve -> verify -> gather -> plan -> (stop unless --apply) -> apply -> prove.

* ``pipeline``: ``avm promote`` / ``avm rollback`` end to end, one receipt per step.
* ``status``: ``avm status``, the live state of a host re-derived and compared with the receipts.
* ``facts`` / ``plan`` / ``apply``: gather a host in one round trip, diff with a pure function,
  apply with undo on any failure.
* ``layout``: every host path and unit name (nothing else spells them).
* ``render`` / ``material``: a verified release rendered into the exact bytes written to a host.
* ``drift`` / ``unitcheck`` / ``releasecheck`` / ``enforcement``: what status compares, and the
  controls observed in force from the sandbox side.
* ``hostops`` / ``hostlock`` / ``state`` / ``events``: host operations, the per-host lock, the
  state recorded in receipts, and the Tier-1 audit events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane._internal.lazy import exports

if TYPE_CHECKING:
    from controlplane.promote.pipeline import Result, run
    from controlplane.promote.status import check

__all__ = ["Result", "check", "run"]
__getattr__ = exports(__name__, {"run": "pipeline", "check": "status", "Result": "pipeline"})
