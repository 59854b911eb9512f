"""Reading the receipt store for people: summaries, one receipt, and a JSONL export.

These read without verifying; ``avm receipts verify`` is the check. Everything streams, one
receipt at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controlplane._internal.fs import atomic_writer
from controlplane.errors import OperationalError, RefusedError, UsageError
from controlplane.evidence import ledger
from controlplane.evidence.receipt import Envelope, MalformedReceipt, Statement, digest_of, open_receipt


def _stored(directory: Path, first: int = 1) -> Iterator[tuple[int, bytes]]:
    """The receipts there are (missing ones are verify's business, not a reader's)."""
    for seq, data in ledger.iter_stored(directory, first):
        if data is not None:
            yield seq, data


def statements(directory: Path, *, newest_first: bool = False) -> Iterator[tuple[int, Statement]]:
    """Every readable receipt's statement, without verifying (for lookups such as "the last
    apply for this target"; unreadable receipts are skipped: `avm receipts verify` reports them)."""
    top = ledger.last_seq(directory)
    order = range(top, 0, -1) if newest_first else range(1, top + 1)
    for seq in order:
        try:
            yield seq, open_receipt(ledger.receipt_path(directory, seq).read_bytes())[2]
        except (OSError, MalformedReceipt):
            continue


def _statement(seq: int, data: bytes) -> Statement:
    return _opened(seq, data)[2]


def _opened(seq: int, data: bytes) -> tuple[Envelope, bytes, Statement]:
    """``open_receipt``; a receipt that does not parse is refused (exit 3) as verify refuses it."""
    try:
        return open_receipt(data)
    except MalformedReceipt as exc:
        raise RefusedError(
            "receipt-malformed",
            f"receipt #{seq} cannot be read: {exc}",
            hint="run `avm receipts verify` to locate the damage",
        ) from exc


def outcome(status: str, result: dict[str, Any]) -> str:
    """What a list shows: a step that completed but whose job failed or timed out says so."""
    job = result.get("status")
    return str(job) if status == "ok" and job in ("failed", "timeout") else status


def summaries(directory: Path, *, last: int | None = None) -> Iterator[dict[str, Any]]:
    top = ledger.last_seq(directory)
    first = max(1, top - last + 1) if last else 1
    for seq, data in _stored(directory, first):
        statement = _statement(seq, data)
        pred, subject = statement.predicate, statement.subject[0]
        yield {
            "seq": seq,
            "kind": pred.kind,
            "status": outcome(pred.status, pred.result),
            "finished": pred.finished,
            "subject": f"{subject.name} {next(iter(subject.digest.values()))[:16]}",
            "digest": digest_of(data),
            "error": pred.error["code"] if pred.error else None,
        }


def show(directory: Path, receipt_id: str) -> dict[str, Any]:
    """One receipt by number or digest prefix (>= 8 hex). Raises ``UsageError``/``OperationalError``."""
    if receipt_id.isdigit() and len(receipt_id) < 8:
        seq = int(receipt_id)
        data = ledger.read(directory, seq)
        return _doc(seq, data)
    prefix = receipt_id.removeprefix("sha256:").lower()
    if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        raise UsageError(
            "receipt-id-invalid",
            f"{receipt_id!r} is neither a receipt number nor a digest prefix",
            hint="pass a number from `avm receipts list`, or at least 8 hex digits of a digest",
        )
    for seq, data in _stored(directory):
        if digest_of(data).startswith(prefix):
            return _doc(seq, data)
    raise OperationalError("receipt-not-found", f"no receipt whose digest starts with {prefix}")


def _doc(seq: int, data: bytes) -> dict[str, Any]:
    envelope, _, statement = _opened(seq, data)
    return {
        "seq": seq,
        "digest": digest_of(data),
        "keyid": envelope.signatures[0].keyid,
        "statement": statement.model_dump(mode="json", by_alias=True),
    }


def export(directory: Path, out: Path) -> tuple[int, str | None]:
    """Write every stored receipt as one JSONL line, atomically. Returns (count, head digest)."""
    out = out.resolve()
    if not out.parent.is_dir():
        raise UsageError("export-path-invalid", f"directory {out.parent} does not exist")
    count, head = 0, None
    with atomic_writer(out) as sink, ledger.locked(directory):
        for _, data in _stored(directory):
            sink.write(data + b"\n")
            count, head = count + 1, digest_of(data)
    return count, head
