"""Offline verification of a receipt chain, streamed: memory stays flat however long it grows.

Each receipt is checked in order: well-formed canonical bytes, a trusted key, a valid DSSE
signature, its sequence number, and the digest of its predecessor. The first failure refuses
(exit 3) with one precise code:

==============================  ============================================================
receipt-truncated               a receipt file (or bundle line) stops mid-document
receipt-malformed               bytes that are not a canonical, schema-valid receipt
receipt-untrusted-key           signed by a key that is not among the trusted keys
receipt-signature-invalid       a trusted key id, but the signature does not match the bytes
receipt-schema-invalid          signed, but the statement or its predicate fails the exported JSON
                                Schema (jsonschema, Draft 2020-12); the JSON path is reported
receipt-missing                 a sequence number with no receipt (deleted, or cut from the end)
receipt-inserted                a receipt whose sequence number was already used before it
receipt-out-of-order            a later receipt stands where an earlier one belongs
receipt-chain-broken            the right sequence number, but not linked to its predecessor
receipt-head-mismatch           the chain's last digest is not the one HEAD / --expect-head says
==============================  ============================================================
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controlplane.errors import RefusedError, UsageError
from controlplane.evidence import ledger
from controlplane.evidence import schema as receiptschema
from controlplane.evidence.keys import TrustedKeys
from controlplane.evidence.receipt import (
    PAYLOAD_TYPE,
    MalformedReceipt,
    Statement,
    digest_of,
    open_envelope,
    pae,
    parse_statement,
)
from controlplane.evidence.receipt import predicate_type as type_for


@dataclasses.dataclass
class Report:
    source: str
    count: int = 0
    head_seq: int = 0
    head_digest: str | None = None
    keyids: set[str] = dataclasses.field(default_factory=set)
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "source": self.source,
            "receipts": self.count,
            "head": {"seq": self.head_seq, "digest": self.head_digest},
            "keyids": sorted(self.keyids),
            "kinds": dict(sorted(self.kinds.items())),
        }


def _refuse(code: str, where: str, message: str, expected: Any = None, actual: Any = None) -> RefusedError:
    return RefusedError(
        code,
        f"{where}: {message}",
        hint="the chain cannot be trusted past this point; keep the files as evidence and investigate",
        details={"where": where, "expected": expected, "actual": actual},
    )


def _from_dir(directory: Path) -> Iterator[tuple[str, bytes | None]]:
    for seq, data in ledger.iter_stored(directory):
        yield ledger.receipt_path(directory, seq).name, data


def _from_bundle(bundle: Path) -> Iterator[tuple[str, bytes | None]]:
    try:
        handle = bundle.open("rb")
    except OSError as exc:
        raise UsageError("bundle-unreadable", f"cannot read bundle {bundle}: {exc.strerror}") from exc
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                yield f"{bundle.name}:{lineno}", line.rstrip(b"\n")


def check_receipt(where: str, data: bytes, trusted: TrustedKeys) -> tuple[Statement, str]:
    """One receipt on its own: canonical bytes, trusted key, signature, then the statement.
    Returns (statement, keyid); raises ``RefusedError`` with the receipt's failure code."""
    try:
        envelope, payload = open_envelope(data)
    except MalformedReceipt as exc:
        code = "receipt-truncated" if exc.truncated else "receipt-malformed"
        raise _refuse(code, where, str(exc)) from exc
    signature = envelope.signatures[0]
    if signature.keyid not in trusted.keys:
        raise _refuse(
            "receipt-untrusted-key",
            where,
            "signed by a key that is not trusted",
            expected=sorted(trusted.keys),
            actual=signature.keyid,
        )
    try:
        raw_sig = base64.b64decode(signature.sig, validate=True)
    except binascii.Error as exc:
        raise _refuse("receipt-malformed", where, "signature is not base64") from exc
    if not trusted.verify(signature.keyid, raw_sig, pae(PAYLOAD_TYPE, payload)):
        raise _refuse("receipt-signature-invalid", where, "signature does not match the receipt bytes")
    receiptschema.check_statement(where, payload)
    try:
        statement = parse_statement(payload)
    except MalformedReceipt as exc:
        raise _refuse("receipt-malformed", where, str(exc)) from exc
    if statement.predicateType != type_for(statement.predicate.kind):
        raise _refuse(
            "receipt-malformed",
            where,
            "predicateType does not match the step kind",
            expected=type_for(statement.predicate.kind),
            actual=statement.predicateType,
        )
    return statement, signature.keyid


def verify(
    trusted: TrustedKeys,
    *,
    directory: Path | None = None,
    bundle: Path | None = None,
    expect_head: str | None = None,
) -> Report:
    """Verify a store directory or an exported JSONL bundle. Raises ``RefusedError`` (exit 3)."""
    if (directory is None) == (bundle is None):
        raise UsageError("verify-source", "verify exactly one of a receipts directory or a bundle")
    items = _from_dir(directory) if directory is not None else _from_bundle(bundle)  # type: ignore[arg-type]
    report = Report(source=str(directory or bundle))
    prev: str | None = None
    for where, data in items:
        seq = report.count + 1
        if data is None:
            raise _refuse("receipt-missing", where, f"receipt #{seq} is missing", f"#{seq}", "no file")
        statement, keyid = check_receipt(where, data, trusted)
        got = statement.predicate.seq
        if got < seq:
            raise _refuse(
                "receipt-inserted",
                where,
                f"sequence #{got} was already used: a receipt was inserted",
                seq,
                got,
            )
        if got > seq:
            # Refused either way; which code depends on whether #seq turns up anywhere later (a
            # swap of receipts far apart is a reorder, not a deletion). The rest of the stream is
            # read one receipt at a time, so memory stays flat however far ahead it is.
            found = next((later for later in items if _peek_seq(later, trusted) == seq), None)
            if found is not None:
                raise _refuse(
                    "receipt-out-of-order",
                    where,
                    f"receipt #{got} stands where #{seq} belongs (#{seq} is at {found[0]})",
                    seq,
                    got,
                )
            raise _refuse(
                "receipt-missing", where, f"receipt #{seq} is missing (chain jumps to #{got})", seq, got
            )
        if statement.predicate.prev != prev:
            raise _refuse(
                "receipt-chain-broken",
                where,
                "not linked to the previous receipt",
                expected=prev,
                actual=statement.predicate.prev,
            )
        prev = digest_of(data)
        report.count = seq
        report.keyids.add(keyid)
        report.kinds[statement.predicate.kind] = report.kinds.get(statement.predicate.kind, 0) + 1
    report.head_seq, report.head_digest = report.count, prev
    if directory is not None:
        head = ledger.read_head(directory)
        if head.seq > report.count:
            raise _refuse(
                "receipt-missing",
                "HEAD",
                "receipts at the end of the chain are missing",
                head.seq,
                report.count,
            )
        if head.seq == report.count and head.digest != prev:
            raise _refuse(
                "receipt-head-mismatch", "HEAD", "HEAD does not name the last receipt", head.digest, prev
            )
    if expect_head is not None and expect_head.removeprefix("sha256:") != prev:
        raise _refuse("receipt-head-mismatch", "--expect-head", "the chain ends elsewhere", expect_head, prev)
    return report


def _peek_seq(item: tuple[str, bytes | None], trusted: TrustedKeys) -> int | None:
    """The verified sequence number of a lookahead item, or None if it does not verify."""
    if item[1] is None:
        return None
    try:
        return check_receipt(item[0], item[1], trusted)[0].predicate.seq
    except RefusedError:
        return None
