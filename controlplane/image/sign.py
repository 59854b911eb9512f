"""cosign-compatible image signatures: the simple-signing payload, signed with a cosign key pair.

What ``cosign sign --key`` signs is this JSON payload (its exact bytes)::

    {"critical":{"identity":{"docker-reference":NAME},
                 "image":{"docker-manifest-digest":"sha256:..."},
                 "type":"cosign container image signature"},"optional":null}

We store it with the base64 signature at ``<home>/oci/signatures/sha256-<hex>.json``. Verifying
checks the signature over the exact stored payload bytes with each trusted key
(``keys/release-trusted``), then that ``critical.image.docker-manifest-digest`` equals the pin,
so a valid signature of another image is refused.

A Sigstore bundle over the same payload (``avm image sign REF --sigstore-bundle FILE``, stored as
``sha256-<hex>.sigstore.json``) is accepted instead, verified by ``sigstorebundle``.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane._internal.loading import Frozen
from controlplane.errors import AvmError, RefusedError
from controlplane.home import Home
from controlplane.jobs.oci.store import store_dir
from controlplane.release import cosign
from controlplane.release.trust import trusted_keys

SIG_TYPE = "cosign container image signature"


class SignatureRecord(Frozen):
    """``<home>/oci/signatures/sha256-<hex>.json``: a cosign simple-signing signature of one image."""

    payload: str  # base64 of the exact signed payload bytes
    signature: str  # base64 DER ECDSA-P256 over those bytes (cosign sign-blob format)
    keyid: str  # sha256 of the signer's SubjectPublicKeyInfo


def payload(name: str, digest: str) -> bytes:
    doc = {
        "critical": {
            "identity": {"docker-reference": name},
            "image": {"docker-manifest-digest": digest},
            "type": SIG_TYPE,
        },
        "optional": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def signature_file(home: Home, digest: str) -> Path:
    return store_dir(home) / "signatures" / (digest.replace(":", "-") + ".json")


def sigstore_bundle_file(home: Home, digest: str) -> Path:
    return store_dir(home) / "signatures" / (digest.replace(":", "-") + ".sigstore.json")


def import_sigstore_bundle(home: Home, name: str, digest: str, raw: bytes) -> tuple[Path, str]:
    """Store a Sigstore bundle over NAME@DIGEST's simple-signing payload once it verifies (the
    same checks as ``verify_image``). Returns (path, who signed). Nothing is stored on refusal."""
    from controlplane.release import sigstoretrust

    verified = sigstoretrust.verify_blob(home, payload(name, digest), raw, commit_required=False)
    path = sigstore_bundle_file(home, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, raw)
    return path, sigstoretrust.describe(verified)


def sign_image(home: Home, name: str, digest: str, key_bytes: bytes, password: bytes) -> Path:
    """Sign NAME@DIGEST with a cosign private key and store the signature. Raises what
    ``cosign.load_private_key`` raises (wrong password, not a key)."""
    private = cosign.load_private_key(key_bytes, password)
    data = payload(name, digest)
    signature = cosign.sign_blob(private, data)
    public_pem = cosign.public_pem_of(private)
    cosign.verify_blob(public_pem, data, signature)
    record = SignatureRecord(
        payload=base64.b64encode(data).decode(), signature=signature, keyid=cosign.public_key_id(public_pem)
    )
    path = signature_file(home, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(record.model_dump(), indent=2, sort_keys=True) + "\n").encode())
    return path


def verify_image(home: Home, name: str, digest: str) -> str:
    """Return the keyid of the trusted key whose signature over the stored payload verifies and
    whose payload names ``digest``. Raises ``RefusedError('image-signature-missing' |
    'image-signature-invalid' | 'image-signature-untrusted' | 'image-signature-digest-mismatch')``."""
    bundle_file = sigstore_bundle_file(home, digest)
    if bundle_file.exists():
        # a Sigstore bundle (keyless or key pair) over the payload rebuilt from the pin: a bundle
        # for another image does not verify. An image has no commit: a CI identity's repository
        # is checked, not a commit.
        from controlplane.release import sigstoretrust

        raw = bundle_file.read_bytes()
        verified = sigstoretrust.verify_blob(home, payload(name, digest), raw, commit_required=False)
        return sigstoretrust.describe(verified)
    path = signature_file(home, digest)
    try:
        record = SignatureRecord.model_validate_json(path.read_bytes())
        data = base64.b64decode(record.payload, validate=True)
        signature = record.signature
    except FileNotFoundError:
        raise RefusedError(
            "image-signature-missing",
            f"image {name}@{digest} has no signature in the store",
            hint=f"sign it: avm image sign {name}@{digest} --key cosign.key",
        ) from None
    except (ValueError, binascii.Error) as exc:
        raise RefusedError("image-signature-invalid", f"{path} is not a signature record: {exc}") from None
    keys = trusted_keys(home)
    if not keys:
        raise RefusedError(
            "image-signature-untrusted",
            "no trusted keys in keys/release-trusted, so no image signature can be accepted",
            hint="trust the signer: avm keys trust --release cosign.pub",
        )
    good = None
    for key in keys:
        try:
            cosign.verify_blob(key.path.read_bytes(), data, signature)
        except AvmError:
            continue
        good = key.keyid
        break
    if good is None:
        raise RefusedError(
            "image-signature-invalid",
            f"the signature of {name}@{digest} does not verify with any trusted key",
            hint="the payload or signature was altered, or an untrusted key signed it",
            details={"trusted": [k.keyid for k in keys], "signed_by": record.keyid},
        )
    try:
        claimed = json.loads(data)["critical"]["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError):
        claimed = None
    if claimed != digest:
        raise RefusedError(
            "image-signature-digest-mismatch",
            f"the signed payload names {claimed}, the pin is {digest}",
            hint="this signature belongs to another image",
            details={"expected": digest, "actual": claimed},
        )
    return good
