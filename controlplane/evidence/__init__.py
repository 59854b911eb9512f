"""Evidence: signed, hash-chained receipts, written by every step and verified offline.

* ``step.record_step``: the only way product code writes a receipt (a context manager).
* ``verify``: an auditor's offline check of a receipt chain against trusted keys.
* ``keys``: the receipt signing key and the trusted-key set.
* ``reader`` / ``report``: read the ledger back; the auditor's report.
* ``receipt`` / ``schema`` / ``ledger``: the in-toto statement format, its JSON Schemas and the
  append-only, hash-chained store.

This package imports only the core leaves (errors, ids, canonical, home, schemas) and the
primitives in ``_internal``, so anything may record evidence and the verifier can be read on
its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane._internal.lazy import exports

if TYPE_CHECKING:
    from controlplane.evidence.keys import TrustedKeys, load_trusted
    from controlplane.evidence.step import Check, Step, record_step

__all__ = ["Check", "Step", "TrustedKeys", "load_trusted", "record_step"]
__getattr__ = exports(
    __name__,
    {"record_step": "step", "Check": "step", "Step": "step", "TrustedKeys": "keys", "load_trusted": "keys"},
)
