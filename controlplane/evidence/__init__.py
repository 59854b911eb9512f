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
