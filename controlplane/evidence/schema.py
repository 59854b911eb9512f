"""Receipts checked against the exported JSON Schemas with jsonschema, as an auditor would.

``avm receipts verify`` validates each signed statement against ``receipt.schema.json`` and its
predicate against the schema of its kind (``receipt-predicate-<kind>.schema.json``), Draft 2020-12
with format checks on. The registry holds only avm's own schemas, built in-process from the
models (a test keeps them byte-identical to the committed files): a ``$ref`` to anything else is
an error, never a download. A document that fails is refused with ``receipt-schema-invalid``
and the JSON path of the first failing value.

jsonschema is imported lazily, so commands that verify nothing do not pay for it.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

from controlplane.errors import RefusedError

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

# Every step kind the product records (a test reads the code for record_step kinds and fails
# when one is missing here). A kind not listed is checked against the generic predicate schema.
KINDS = (
    "apply",
    "approval",
    "approver-trusted",
    "bundle-verify",
    "egress-request-denied",
    "egress-requests",
    "image-build",
    "image-provenance",
    "job-probe-egress",
    "job-run",
    "key-created",
    "plan",
    "release-key-trusted",
    "rollback-target",
    "sign",
    "sigstore-identity-trusted",
    "status",
    "vm-down",
    "vm-up",
)
ID_PREFIX = "urn:agent-vm:schema:"


def schema_id(stem: str) -> str:
    return f"{ID_PREFIX}{stem}:v1"


def predicate_stem(kind: str) -> str:
    return f"receipt-predicate-{kind}"


def predicate_schema(kind: str) -> dict[str, Any]:
    """The schema of one kind's predicate: the common predicate with ``kind`` fixed."""
    from controlplane.evidence.receipt import Predicate, predicate_type

    schema = Predicate.model_json_schema()
    schema["properties"]["kind"] = {**schema["properties"]["kind"], "const": kind}
    schema["title"] = f"Predicate of {predicate_type(kind)}"
    return schema


def receipt_schemas() -> dict[str, dict[str, Any]]:
    """stem -> schema for the statement and each kind's predicate (without $schema/$id)."""
    from controlplane.evidence.receipt import Predicate, Statement

    out: dict[str, dict[str, Any]] = {
        "receipt": Statement.model_json_schema(),
        "receipt-predicate": Predicate.model_json_schema(),
    }
    for kind in KINDS:
        out[predicate_stem(kind)] = predicate_schema(kind)
    return out


@functools.cache
def _validators() -> dict[str, Validator]:
    from jsonschema import Draft202012Validator, FormatChecker
    from referencing import Registry, Resource
    from referencing.exceptions import NoSuchResource

    from controlplane.schemas import finish

    def refuse_remote(uri: str) -> Resource[Any]:
        raise NoSuchResource(ref=uri)  # type: ignore[call-arg]  # offline: a $ref outside avm's schemas is never fetched

    schemas = {stem: finish(stem, schema) for stem, schema in receipt_schemas().items()}
    registry: Registry[Any] = Registry(retrieve=refuse_remote).with_resources(  # type: ignore[call-arg]
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()
    )
    checker = FormatChecker()
    return {
        stem: Draft202012Validator(schema, registry=registry, format_checker=checker)
        for stem, schema in schemas.items()
    }


def _path(parts: Any) -> str:
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def check(where: str, stem: str, doc: Any, prefix: tuple[str | int, ...] = ()) -> None:
    """Refuse ``doc`` with ``receipt-schema-invalid`` unless it is valid under schema ``stem``."""
    validator = _validators()[stem]
    if validator.is_valid(doc):
        return
    error = min(
        validator.iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message), default=None
    )
    if error is None:
        return
    path = _path((*prefix, *error.absolute_path))
    actual = json.dumps(error.instance)[:200]
    raise RefusedError(
        "receipt-schema-invalid",
        f"{where}: {path} does not match {stem}.schema.json: {error.message[:300]}",
        hint="the receipt is signed but not a document avm writes; keep it as evidence and investigate",
        details={"where": where, "path": path, "schema": schema_id(stem), "actual": actual},
    )


def check_statement(where: str, payload: bytes) -> None:
    """Validate a verified payload: the statement, then its predicate against its kind's schema."""
    try:
        doc = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # not JSON at all: parse_statement reports it as receipt-malformed
    check(where, "receipt", doc)
    kind = doc["predicate"]["kind"]
    stem = predicate_stem(kind) if kind in KINDS else "receipt-predicate"
    check(where, stem, doc["predicate"], ("predicate",))
