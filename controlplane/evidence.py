"""Evidence for one step: what was observed, recorded as a signed, hash-chained receipt.

Usage (the only way product code writes receipts)::

    with record_step(home, "vm-up", inputs={"name": name, "backend": "qemu"}) as step:
        step.subject(f"image:{name}", image_digest)      # what was acted on (>= 1 required)
        step.command(result)                               # a RunResult: masked argv, rc, duration
        step.observe("accelerator", "tcg")                 # observed facts, never hopes
        step.check("qemu-process-gone", ok=True, detail="pid 1234 not in /proc")
        step.event("gate.decision", gate="signature", outcome="pass")
        step.non_claim("the guest's clock was not checked")
        step.result["boot_to_ssh_s"] = 11.2
    print(step.receipt_id)

On normal exit the receipt says ``status: ok``. If the block raises, the receipt is still
written: ``refused`` for ``RefusedError``, ``failed`` for anything else, with the error code and
message, and the exception propagates unchanged. Steps that never ran are not recorded as
having run. No secret value may be passed to any of these methods.

THIS FILE IS AN INTERFACE STUB: the implementation lands with the receipt store (ledger).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from controlplane.home import Home
from controlplane.transport.base import RunResult


class Step:
    kind: str
    receipt_id: str | None
    result: dict[str, Any]

    def subject(self, name: str, digest: str) -> None:
        raise NotImplementedError

    def command(self, result: RunResult) -> None:
        raise NotImplementedError

    def observe(self, key: str, value: Any) -> None:
        raise NotImplementedError

    def check(self, name: str, *, ok: bool, detail: str = "") -> None:
        raise NotImplementedError

    def event(self, type_: str, **fields: Any) -> None:
        raise NotImplementedError

    def non_claim(self, text: str) -> None:
        raise NotImplementedError


@contextmanager
def record_step(home: Home, kind: str, *, inputs: Mapping[str, Any] | None = None) -> Iterator[Step]:
    raise NotImplementedError
    yield Step()
