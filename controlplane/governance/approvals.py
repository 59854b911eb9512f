"""Approvals bound to one plan digest, signed by the approver's own ed25519 key.

An approval is a DSSE envelope signed by an *approver* key (never the home's receipt-signing
key, which is the promoter's identity) over canonical JSON naming exactly one plan digest and an
expiry. ``avm approve`` records it in the ledger as a receipt of kind ``approval`` (the envelope
inside, so the approver's signature travels with the evidence). ``promote --apply`` counts the
distinct trusted approvers whose unexpired approval names exactly this plan digest; a changed
plan has a different digest, so earlier approvals simply no longer apply.

Layout: ``keys/approvers/<keyid hex>.pub`` holds the trusted approver public keys.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from controlplane._internal.fs import write_new
from controlplane.canonical import canonical_bytes
from controlplane.errors import RefusedError, UsageError
from controlplane.evidence import keys
from controlplane.evidence import reader as auditlog
from controlplane.evidence.receipt import pae
from controlplane.home import Home

PAYLOAD_TYPE = "application/vnd.agent-vm.approval+json"
APPROVAL_TYPE = "https://agent-vm.dev/approval/v1"
_DURATION = re.compile(r"^([1-9][0-9]{0,4})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_S = 30 * 86400


@dataclasses.dataclass(frozen=True)
class Approval:
    receipt: str
    approver: str  # key id of the approver
    plan_digest: str
    expires: str


def parse_ttl(text: str) -> int:
    """``30m``, ``24h``, ``7d`` -> seconds. Raises ``UsageError('expires-invalid')``."""
    m = _DURATION.fullmatch(text)
    seconds = int(m.group(1)) * _UNITS[m.group(2)] if m else 0
    if not m or seconds > MAX_TTL_S:
        raise UsageError(
            "expires-invalid",
            f"--expires {text!r} is not a duration up to 30d",
            hint="use a number and a unit: 90s, 30m, 24h, 7d",
            details={"expected": "N[s|m|h|d] <= 30d", "actual": text},
        )
    return seconds


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def approvers_dir(home: Home) -> Path:
    return home.keys / "approvers"


def init_approver(out_dir: Path) -> tuple[str, Path, Path]:
    """A new approver key pair in ``out_dir``: approver.key (0600) and approver.pub.
    Raises ``RefusedError('key-exists')`` rather than overwrite a key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    priv, pub = out_dir / "approver.key", out_dir / "approver.pub"
    if priv.exists() or pub.exists():
        raise RefusedError(
            "key-exists", f"an approver key already exists in {out_dir}", hint="use another --out"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_new(priv, pem, 0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return keys.key_id(key.public_key()), priv, pub


def trust_approver(home: Home, pub: Path) -> tuple[str, Path]:
    """Trust an approver's public key. Raises ``RefusedError('approver-is-promoter')`` for the
    home's own receipt-signing key: the promoter cannot approve their own plan."""
    trusted = keys.load_trusted([pub])
    keyid = next(iter(trusted.keys))
    if keys.public_path(home).exists() and keyid == keys.load_signer(home).keyid:
        raise RefusedError(
            "approver-is-promoter",
            "this is the home's receipt-signing key, the promoter's own identity",
            hint="an approver uses a key of their own: avm keys approver-init --out DIR",
            details={"expected": "a key other than the promoter's", "actual": keyid},
        )
    directory = approvers_dir(home)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest = directory / f"{keyid.removeprefix('sha256:')[:32]}.pub"
    dest.write_bytes(pub.read_bytes())
    return keyid, dest


def sign(key_path: Path, plan_digest: str, ttl_s: int) -> tuple[str, dict[str, Any]]:
    """An approval envelope signed with the approver key at ``key_path``: (keyid, envelope)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not re.fullmatch(r"sha256:[0-9a-f]{64}", plan_digest):
        raise UsageError("plan-digest-invalid", f"{plan_digest!r} is not a plan digest (sha256:<64 hex>)")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise UsageError("approver-key-unreadable", f"cannot read approver key {key_path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError("approver-key-unreadable", f"{key_path} is not an ed25519 private key")
    keyid = keys.key_id(key.public_key())
    now = _now()
    payload = canonical_bytes(
        {
            "_type": APPROVAL_TYPE,
            "plan_digest": plan_digest,
            "approver": keyid,
            "issued": _iso(now),
            "expires": _iso(now + dt.timedelta(seconds=ttl_s)),
        }
    )
    sig = key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": keyid, "sig": base64.b64encode(sig).decode()}],
    }
    return keyid, envelope


def _trusted(home: Home) -> keys.TrustedKeys:
    paths = sorted(approvers_dir(home).glob("*.pub")) if approvers_dir(home).is_dir() else []
    return keys.load_trusted(paths) if paths else keys.TrustedKeys({})


def _judge(
    envelope: Any, trusted: keys.TrustedKeys, promoter: str, now: dt.datetime
) -> tuple[dict[str, Any], str]:
    """(payload, reason) where reason is '' for a valid approval."""
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
        sig = envelope["signatures"][0]
        doc: dict[str, Any] = json.loads(payload)
        keyid = str(sig["keyid"])
        if envelope["payloadType"] != PAYLOAD_TYPE or doc.get("_type") != APPROVAL_TYPE:
            return {}, "not-an-approval"
    except (KeyError, IndexError, TypeError, ValueError):
        return {}, "malformed"
    if keyid == promoter or doc.get("approver") == promoter:
        return doc, "by-promoter"
    if keyid not in trusted.keys or doc.get("approver") != keyid:
        return doc, "untrusted-approver"
    if not trusted.verify(keyid, base64.b64decode(sig["sig"]), pae(PAYLOAD_TYPE, payload)):
        return doc, "bad-signature"
    if dt.datetime.fromisoformat(str(doc["expires"]).replace("Z", "+00:00")) <= now:
        return doc, "expired"
    return doc, ""


def find(home: Home, plan_digest: str) -> tuple[list[Approval], list[dict[str, str]], int]:
    """Valid approvals of exactly ``plan_digest`` (one per approver), the rejected ones for this
    digest with their reason, and how many approvals name other plans."""
    trusted, promoter, now = _trusted(home), keys.load_signer(home).keyid, _now()
    valid: dict[str, Approval] = {}
    rejected: list[dict[str, str]] = []
    other = 0
    # No approval outlives MAX_TTL_S, so the scan walks back from HEAD and stops at receipts
    # older than that (plus a day of clock slack): bounded by recent history, not chain length.
    horizon = _iso(now - dt.timedelta(seconds=MAX_TTL_S + 86400))
    for seq, statement in auditlog.statements(home.receipts, newest_first=True):
        pred = statement.predicate
        if pred.finished < horizon:
            break
        if pred.kind != "approval" or pred.status != "ok":
            continue
        doc, reason = _judge(pred.result.get("approval"), trusted, promoter, now)
        if doc.get("plan_digest") != plan_digest:
            other += 1
        elif reason:
            rejected.append({"receipt": str(seq), "approver": str(doc.get("approver")), "reason": reason})
        else:
            valid.setdefault(
                str(doc["approver"]),
                Approval(str(seq), str(doc["approver"]), plan_digest, str(doc["expires"])),
            )
    return list(valid.values()), rejected, other


def require(home: Home, plan_digest: str, needed: int, *, why: str) -> list[Approval]:
    """At least ``needed`` distinct valid approvers for ``plan_digest``, else
    ``RefusedError('approval-missing')`` naming what was found and why each was rejected."""
    valid, rejected, other = find(home, plan_digest)
    if len(valid) >= needed:
        return valid
    reasons = ", ".join(f"#{r['receipt']} {r['reason']}" for r in rejected) or "none"
    raise RefusedError(
        "approval-missing",
        f"{why} needs {needed} approver(s) for plan {plan_digest}; found {len(valid)} valid "
        f"(rejected for this plan: {reasons}; {other} approval(s) name other plans)",
        hint=f"each approver runs `avm approve --plan {plan_digest} --key APPROVER.key`; "
        "approvals of an earlier plan do not carry over",
        details={
            "expected": needed,
            "actual": len(valid),
            "approvers": [a.approver for a in valid],
            "rejected": rejected,
            "other_plans": other,
        },
    )
