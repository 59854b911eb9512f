"""Key-pair Sigstore bundles (``cosign sign-blob --key --bundle``): avm's own verification.

sigstore-python cannot load a bundle whose verification material is a ``publicKey`` (it needs a
certificate), so avm checks these with ``cryptography`` against the release keys the operator
trusts, as its cosign code does for plain signatures:

- a ``messageSignature``: the ``messageDigest`` is sha256 of the artifact and the ECDSA P-256
  signature verifies over the artifact bytes; a ``dsseEnvelope``: the signature verifies over
  DSSE's PAE and an in-toto subject names the artifact's sha256;
- a transparency-log entry, when present, must be a ``hashedrekord`` naming exactly this
  digest, signature and key; its inclusion proof must lead to its root hash (RFC 6962), the
  checkpoint must be signed by a log in the trusted root and name that root and size, and the
  signed entry timestamp (inclusion promise), when present, must verify with the same log key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.canonical import canonical_bytes
from controlplane.errors import RefusedError
from controlplane.release import cosign


def _refuse(code: str, message: str, **details: Any) -> RefusedError:
    return RefusedError(
        code,
        message,
        hint="the bundle does not prove what it claims; nothing was changed",
        details=details,
    )


def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _refuse("sigstore-bundle-malformed", f"{what} is not base64") from exc


def _ecdsa_ok(public: Any, signature: bytes, data: bytes) -> bool:
    try:
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _pae(payload_type: str, payload: bytes) -> bytes:
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def dsse_subject_matches(payload: bytes, artifact: bytes) -> bool:
    """An in-toto statement in the envelope names the artifact's sha256 among its subjects."""
    try:
        statement = json.loads(payload)
        subjects = statement["subject"]
        want = hashlib.sha256(artifact).hexdigest()
        return any(s.get("digest", {}).get("sha256") == want for s in subjects)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def verify_keyed(
    doc: Mapping[str, Any],
    artifact: bytes,
    trusted_keys: Mapping[str, bytes],
    trusted_root: Mapping[str, Any],
) -> tuple[str, dict[str, Any]]:
    """Verify a key-pair bundle. Returns (key id, what was checked); raises ``RefusedError``."""
    if not trusted_keys:
        raise _refuse(
            "sigstore-key-untrusted",
            "the bundle is signed with a key pair, and no release key is trusted",
            expected="a key trusted with `avm keys trust --release cosign.pub`",
        )
    if "messageSignature" in doc:
        message = doc["messageSignature"]
        signature = _b64(message.get("signature"), "messageSignature.signature")
        digest = message.get("messageDigest", {})
        want = hashlib.sha256(artifact).digest()
        if digest.get("algorithm") != "SHA2_256" or _b64(digest.get("digest"), "messageDigest") != want:
            raise _refuse(
                "sigstore-digest-mismatch",
                "the bundle's messageDigest is not sha256 of the artifact",
                expected=want.hex(),
                actual=digest,
            )
        signed = artifact
    elif "dsseEnvelope" in doc:
        envelope = doc["dsseEnvelope"]
        payload = _b64(envelope.get("payload"), "dsseEnvelope.payload")
        sigs = envelope.get("signatures") or []
        if len(sigs) != 1:
            raise _refuse("sigstore-bundle-malformed", f"expected one DSSE signature, found {len(sigs)}")
        signature = _b64(sigs[0].get("sig"), "dsseEnvelope.signatures[0].sig")
        signed = _pae(str(envelope.get("payloadType")), payload)
        if not dsse_subject_matches(payload, artifact):
            raise _refuse("sigstore-digest-mismatch", "no in-toto subject of the envelope names the artifact")
    else:
        raise _refuse("sigstore-bundle-malformed", "the bundle has neither messageSignature nor dsseEnvelope")
    for keyid, pem in sorted(trusted_keys.items()):
        public = cosign.load_public_key(pem)
        if _ecdsa_ok(public, signature, signed):
            checked: dict[str, Any] = {"signature": "ecdsa-p256-sha256"}
            entries = doc.get("verificationMaterial", {}).get("tlogEntries") or []
            for entry in entries:
                checked["tlog"] = check_tlog_entry(entry, artifact, signature, public, trusted_root)
            return keyid, checked
    raise _refuse(
        "sigstore-key-untrusted",
        "the bundle's signature does not verify with any trusted release key",
        expected=sorted(trusted_keys),
        actual=doc.get("verificationMaterial", {}).get("publicKey", {}).get("hint"),
    )


def _spki(public: Any) -> bytes:
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _log_key(trusted_root: Mapping[str, Any], log_id: bytes) -> Any:
    for tlog in trusted_root.get("tlogs", []):
        key = tlog.get("publicKey", {})
        if _b64(tlog.get("logId", {}).get("keyId"), "trusted root logId") == log_id:
            return serialization.load_der_public_key(_b64(key.get("rawBytes"), "trusted root key"))
    raise _refuse(
        "sigstore-tlog-untrusted",
        "the transparency-log entry is from a log that is not in the trusted root",
        actual=base64.b64encode(log_id).decode(),
    )


def _inclusion_ok(index: int, size: int, leaf: bytes, proof: list[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: verify an inclusion proof."""
    if index < 0 or index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def _checkpoint(text: str, log_key: Any, log_id: bytes, root: bytes, size: int) -> None:
    body, sep, sigs = text.partition("\n\n")
    lines = body.split("\n")
    if not sep or len(lines) < 3:
        raise _refuse("sigstore-tlog-invalid", "the checkpoint is not a signed note")
    if lines[1] != str(size) or _b64(lines[2], "checkpoint root hash") != root:
        raise _refuse("sigstore-tlog-invalid", "the checkpoint does not name the proof's root hash and size")
    signed = (body + "\n").encode()
    for line in sigs.splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == "\u2014":
            blob = _b64(parts[2], "checkpoint signature")
            if blob[:4] == log_id[:4] and _ecdsa_ok(log_key, blob[4:], signed):
                return
    raise _refuse("sigstore-tlog-invalid", "the checkpoint is not signed by the log's key")


def check_tlog_entry(
    entry: Mapping[str, Any], artifact: bytes, signature: bytes, public: Any, trusted_root: Mapping[str, Any]
) -> dict[str, Any]:
    """A hashedrekord v0.0.1 entry for exactly this artifact, signature and key, proven included."""
    kind = entry.get("kindVersion", {})
    if (kind.get("kind"), kind.get("version")) != ("hashedrekord", "0.0.1"):
        raise _refuse("sigstore-tlog-unsupported", f"avm checks hashedrekord 0.0.1 log entries, not {kind}")
    body = _b64(entry.get("canonicalizedBody"), "canonicalizedBody")
    try:
        spec = json.loads(body)["spec"]
        logged_hash = spec["data"]["hash"]
        logged_sig = _b64(spec["signature"]["content"], "logged signature")
        logged_key = serialization.load_pem_public_key(_b64(spec["signature"]["publicKey"]["content"], "key"))
    except (ValueError, KeyError, TypeError) as exc:
        raise _refuse("sigstore-tlog-invalid", f"the log entry body is not a hashedrekord: {exc}") from exc
    if (
        logged_hash != {"algorithm": "sha256", "value": hashlib.sha256(artifact).hexdigest()}
        or logged_sig != signature
        or _spki(logged_key) != _spki(public)
    ):
        raise _refuse("sigstore-tlog-mismatch", "the log entry is for another artifact, signature or key")
    log_id = _b64(entry.get("logId", {}).get("keyId"), "logId")
    log_key = _log_key(trusted_root, log_id)
    proof = entry.get("inclusionProof")
    if not proof:
        raise _refuse("sigstore-tlog-invalid", "the log entry has no inclusion proof")
    try:
        index, size = int(proof["logIndex"]), int(proof["treeSize"])
        root = _b64(proof["rootHash"], "rootHash")
        path = [_b64(h, "proof hash") for h in proof.get("hashes", [])]
        note = str(proof["checkpoint"]["envelope"])
    except (KeyError, ValueError, TypeError) as exc:
        raise _refuse("sigstore-tlog-invalid", f"the inclusion proof is incomplete: {exc}") from exc
    if not _inclusion_ok(index, size, hashlib.sha256(b"\x00" + body).digest(), path, root):
        raise _refuse("sigstore-tlog-invalid", "the inclusion proof does not lead to its root hash")
    _checkpoint(note, log_key, log_id, root, size)
    promise = entry.get("inclusionPromise")
    if promise:
        set_doc = {
            "body": entry["canonicalizedBody"],
            "integratedTime": int(entry["integratedTime"]),
            "logID": log_id.hex(),
            "logIndex": int(entry["logIndex"]),
        }
        if not _ecdsa_ok(log_key, _b64(promise.get("signedEntryTimestamp"), "SET"), canonical_bytes(set_doc)):
            raise _refuse("sigstore-tlog-invalid", "the signed entry timestamp does not verify")
    return {"log_id": log_id.hex(), "log_index": int(entry.get("logIndex", -1)), "tree_size": size}
