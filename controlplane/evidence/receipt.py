"""The receipt: an in-toto Statement v1 in a DSSE envelope, one canonical-JSON file per step.

What is signed, hashed and stored are the same bytes:

- the statement is serialised once as RFC 8785 canonical JSON (the DSSE payload);
- the signature is ed25519 over DSSE's pre-authentication encoding (PAE) of that payload;
- the envelope is stored as canonical JSON, and the next receipt's ``predicate.prev`` is the
  sha256 of exactly those stored bytes (so the chain covers the signatures too).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, Final, Literal

from pydantic import ConfigDict, Field, ValidationError

from controlplane._internal.loading import Frozen
from controlplane.canonical import canonical_bytes, sha256_hex
from controlplane.evidence.keys import Signer
from controlplane.ids import pattern_validator

STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
PREDICATE_PREFIX = "https://agent-vm.dev/receipt/"


# what evidence writes: a kebab-case step kind, sha256 hex chain links, UTC timestamps in ms
_KIND_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_TIME_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?Z$")
Kind = Annotated[str, pattern_validator(_KIND_RE, "receipt kind", "kebab-case, 1-64 characters")]
Hex64 = Annotated[str, pattern_validator(_HEX64_RE, "sha256", "expected 64 lowercase hex")]
Timestamp = Annotated[
    str, pattern_validator(_TIME_RE, "timestamp", "expected UTC like 2026-01-01T00:00:00.000Z")
]


def predicate_type(kind: str) -> str:
    return f"{PREDICATE_PREFIX}{kind}/v1"


class Subject(Frozen):
    name: str
    digest: dict[str, str] = Field(description="algorithm -> hex, e.g. {'sha256': '...'}")


class CommandRecord(Frozen):
    argv: list[str] = Field(description="masked argv: secret values never appear")
    rc: int | None
    duration_s: float


class CheckRecord(Frozen):
    name: str
    ok: bool
    detail: str = ""


class Predicate(Frozen):
    kind: Kind
    seq: int = Field(ge=1)
    prev: Hex64 | None = Field(description="sha256 hex of the previous stored receipt; null for the first")
    status: Literal["ok", "refused", "failed"]
    started: Timestamp
    finished: Timestamp
    duration_s: float
    control_host: str
    inputs: dict[str, Any] = {}
    commands: list[CommandRecord] = []
    observations: dict[str, Any] = {}
    checks: list[CheckRecord] = []
    events: list[dict[str, Any]] = []
    non_claims: list[str] = []
    result: dict[str, Any] = {}
    error: dict[str, Any] | None = None


class Statement(Frozen):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    type_: Literal["https://in-toto.io/Statement/v1"] = Field(alias="_type")
    subject: list[Subject] = Field(min_length=1)
    predicateType: str  # the in-toto field name
    predicate: Predicate


class Signature(Frozen):
    keyid: str
    sig: str


class Envelope(Frozen):
    """A DSSE envelope as stored on disk."""

    payload: str
    payloadType: Literal["application/vnd.in-toto+json"]  # the DSSE field name
    signatures: list[Signature] = Field(min_length=1, max_length=1)


class MalformedReceipt(ValueError):
    """Bytes that are not a well-formed receipt; ``truncated`` when they stop short."""

    def __init__(self, message: str, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def seal(statement: Statement, signer: Signer) -> bytes:
    """Sign a statement; return the exact bytes to store."""
    payload = canonical_bytes(statement.model_dump(mode="json", by_alias=True))
    sig = signer.sign(pae(PAYLOAD_TYPE, payload))
    envelope = Envelope(
        payload=base64.b64encode(payload).decode(),
        payloadType=PAYLOAD_TYPE,
        signatures=[Signature(keyid=signer.keyid, sig=base64.b64encode(sig).decode())],
    )
    return canonical_bytes(envelope.model_dump(mode="json"))


def digest_of(stored: bytes) -> str:
    """The chain digest of a stored receipt (what the next receipt's ``prev`` carries)."""
    return sha256_hex(stored)


def open_envelope(stored: bytes) -> tuple[Envelope, bytes]:
    """Parse stored bytes into (envelope, payload bytes). Checks no signature: verify the payload
    before parsing it with ``parse_statement``.

    Raises ``MalformedReceipt`` (with ``truncated=True`` when the bytes end mid-document).
    """
    try:
        doc = json.loads(stored)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # an envelope is one JSON object: bytes that open one but never close it were cut short
        body = stored.strip()
        cut = not body or (body.startswith(b"{") and not body.endswith(b"}"))
        raise MalformedReceipt(f"not JSON: {exc}", truncated=cut) from exc
    try:
        envelope = Envelope.model_validate(doc)
        payload = base64.b64decode(envelope.payload, validate=True)
    except (ValidationError, binascii.Error) as exc:
        raise MalformedReceipt(f"not a receipt envelope: {exc}".splitlines()[0]) from exc
    if canonical_bytes(doc) != stored:
        raise MalformedReceipt("stored bytes are not the canonical form of the envelope")
    return envelope, payload


def parse_statement(payload: bytes) -> Statement:
    """Raises ``MalformedReceipt`` if the (verified) payload is not a valid statement."""
    try:
        return Statement.model_validate_json(payload)
    except ValidationError as exc:
        raise MalformedReceipt(f"not a receipt statement: {exc}".splitlines()[0]) from exc


def open_receipt(stored: bytes) -> tuple[Envelope, bytes, Statement]:
    """Parse without verifying (for display; ``avm receipts verify`` is the check)."""
    envelope, payload = open_envelope(stored)
    return envelope, payload, parse_statement(payload)


def schema() -> dict[str, Any]:
    """JSON Schema of the signed statement (the payload auditors read)."""
    return Statement.model_json_schema(by_alias=True)
