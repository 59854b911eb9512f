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
written: ``refused`` for ``RefusedError`` and ``UsageError`` (nothing was changed), ``failed`` for
anything else, with the error code and message, and the exception propagates unchanged (an
``AvmError`` carries the receipt's number in ``receipt``). An error raised between steps is
recorded with ``record_unrecorded``. Steps that never ran are not recorded as
having run. No secret value may be passed to any of these methods.

The signing key is loaded before the block runs: without a key nothing runs (fail closed).
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from controlplane.canonical import canonical_bytes, sha256_hex
from controlplane.errors import AvmError, RefusedError, UsageError
from controlplane.evidence import keys, ledger
from controlplane.evidence.receipt import (
    STATEMENT_TYPE,
    CheckRecord,
    CommandRecord,
    Predicate,
    Statement,
    Subject,
    predicate_type,
    seal,
)
from controlplane.home import Home

if TYPE_CHECKING:
    from controlplane.transport.base import RunResult


class Check(NamedTuple):
    """One observation that must hold (teardown left nothing, a rule is loaded, ...): what
    ``Step.check`` records. A tuple, so ``name, ok, detail = check`` works."""

    name: str
    ok: bool
    detail: str = ""


Status = Literal["ok", "refused", "failed"]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def split_digest(digest: str) -> dict[str, str]:
    """``sha256:<hex>`` (or bare hex) -> the in-toto digest set ``{"sha256": hex}``."""
    algo, _, value = digest.rpartition(":")
    return {algo or "sha256": value}


class Step:
    """What one step observed. Filled by the block, sealed into a receipt when it ends."""

    def __init__(self, kind: str, inputs: Mapping[str, Any]) -> None:
        self.kind = kind
        self.inputs = dict(inputs)
        self.receipt_id: str | None = None
        self.receipt_digest: str | None = None
        self.result: dict[str, Any] = {}
        self.subjects: list[Subject] = []
        self.commands: list[CommandRecord] = []
        self.observations: dict[str, Any] = {}
        self.checks: list[CheckRecord] = []
        self.events: list[dict[str, Any]] = []
        self.non_claims: list[str] = []

    def subject(self, name: str, digest: str) -> None:
        self.subjects.append(Subject(name=name, digest=split_digest(digest)))

    def command(self, result: RunResult) -> None:
        self.commands.append(
            CommandRecord(argv=result.argv, rc=result.rc, duration_s=round(result.duration_s, 4))
        )

    def observe(self, key: str, value: Any) -> None:
        self.observations[key] = value

    def check(self, name: str, *, ok: bool, detail: str = "") -> None:
        self.checks.append(CheckRecord(name=name, ok=ok, detail=detail))

    def event(self, type_: str, **fields: Any) -> None:
        self.events.append({"type": type_, **fields})

    def non_claim(self, text: str) -> None:
        self.non_claims.append(text)

    def statement(self, seq: int, prev: str | None, status: Status, timing: dict[str, Any]) -> Statement:
        subjects = self.subjects or [
            # a step refused before it touched anything still names what it was asked to do
            Subject(name=f"inputs:{self.kind}", digest={"sha256": sha256_hex(canonical_bytes(self.inputs))})
        ]
        predicate = Predicate(
            kind=self.kind,
            seq=seq,
            prev=prev,
            status=status,
            control_host=socket.gethostname(),
            inputs=self.inputs,
            commands=self.commands,
            observations=self.observations,
            checks=self.checks,
            events=self.events,
            non_claims=self.non_claims,
            result=self.result,
            **timing,
        )
        return Statement(
            type_=STATEMENT_TYPE,
            subject=subjects,
            predicateType=predicate_type(self.kind),
            predicate=predicate,
        )


def status_for(exc: BaseException) -> Status:
    """How a step that raised ``exc`` is recorded: a refusal (a gate said no, or the input was
    invalid; nothing was changed) or a failure (something broke)."""
    return "refused" if isinstance(exc, (RefusedError, UsageError)) else "failed"


def _error_of(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, AvmError):
        return {"code": exc.code, "message": exc.message}
    return {"code": "internal" if isinstance(exc, Exception) else "interrupted", "message": repr(exc)}


def _seal(
    home: Home,
    signer: keys.Signer,
    step: Step,
    status: Status,
    error: dict[str, Any] | None,
    timing: dict[str, Any],
) -> None:
    def build(seq: int, prev: str | None) -> bytes:
        statement = step.statement(seq, prev, status, timing)
        if error is not None:
            statement = statement.model_copy(
                update={"predicate": statement.predicate.model_copy(update={"error": error})}
            )
        return seal(statement, signer)

    head = ledger.append(home.receipts, build)
    step.receipt_id = str(head.seq)
    step.receipt_digest = head.digest


@contextmanager
def record_step(home: Home, kind: str, *, inputs: Mapping[str, Any] | None = None) -> Iterator[Step]:
    """Run a block as one evidenced step. Raises ``OperationalError('key-missing')`` before the
    block runs if the home has no signing key; re-raises whatever the block raises, after
    writing the receipt (an ``AvmError`` then names it in ``receipt``)."""
    signer = keys.load_signer(home)
    step = Step(kind, inputs or {})
    started, t0 = _now(), time.monotonic()
    status: Status = "ok"
    raised: BaseException | None = None
    try:
        yield step
    except BaseException as exc:
        status, raised = status_for(exc), exc
        raise
    finally:
        timing = {"started": started, "finished": _now(), "duration_s": round(time.monotonic() - t0, 4)}
        _seal(home, signer, step, status, _error_of(raised) if raised else None, timing)
        if isinstance(raised, AvmError) and raised.receipt is None:
            raised.receipt = step.receipt_id


def record_unrecorded(
    home: Home, kind: str, exc: AvmError, *, inputs: Mapping[str, Any] | None = None
) -> None:
    """Give an error that was raised outside every step its own receipt of ``kind``: a refusal
    between two steps (a secret that does not resolve, a plan that changed, a locked host) must
    leave evidence too. Does nothing if a step already recorded ``exc``. Never raises: the error
    being reported stays the one raised, and ``details['receipt_error']`` says why it could not
    be recorded (no key, an unwritable store)."""
    if exc.receipt is not None:
        return
    step, now = Step(kind, inputs or {}), _now()
    timing = {"started": now, "finished": now, "duration_s": 0.0}
    try:
        _seal(home, keys.load_signer(home), step, status_for(exc), _error_of(exc), timing)
    except (OSError, AvmError) as err:
        exc.details["receipt_error"] = str(err)
        return
    exc.receipt = step.receipt_id
