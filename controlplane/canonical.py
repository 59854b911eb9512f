"""Canonical JSON (RFC 8785) and domain-separated hashing.

What is hashed, what is signed and what is stored are the same bytes: callers serialise once
with ``canonical_bytes`` and pass those bytes around.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from controlplane.errors import UsageError


def canonical_bytes(value: Any) -> bytes:
    """Serialise ``value`` as RFC 8785 canonical JSON.

    Raises ``UsageError('not-canonicalizable')`` for values JSON cannot carry exactly
    (floats that are NaN/inf, integers beyond 2**53, non-string keys).
    """
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise UsageError(
            "not-canonicalizable",
            f"value cannot be written as canonical JSON: {exc}",
            hint="use strings for large integers and avoid NaN/infinity",
        ) from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of raw bytes (content addressing, OCI style)."""
    return "sha256:" + sha256_hex(data)


def domain_digest(domain: str, data: bytes) -> str:
    """A domain-separated digest: sha256 over ``avm:<domain>\\0`` + data.

    Separating domains keeps a plan digest from ever being mistaken for a receipt digest
    of the same bytes.
    """
    if "\0" in domain:
        raise ValueError("domain must not contain NUL")
    return "sha256:" + hashlib.sha256(b"avm:" + domain.encode() + b"\0" + data).hexdigest()
