"""cosign-compatible key pairs and blob signatures, with ``cryptography`` (+ PyNaCl for key files).

Formats (as written and accepted by ``cosign generate-key-pair`` / ``sign-blob`` / ``verify-blob``):

* ``cosign.pub``: PKIX ``PUBLIC KEY`` PEM of an ECDSA P-256 key.
* ``cosign.key``: PEM type ``ENCRYPTED SIGSTORE PRIVATE KEY`` (older cosign: ``ENCRYPTED COSIGN
  PRIVATE KEY``) whose body is the JSON ``{"kdf":{"name":"scrypt","params":{"N":32768,"r":8,
  "p":1},"salt":B64},"cipher":{"name":"nacl/secretbox","nonce":B64},"ciphertext":B64}``: a PKCS#8
  DER key sealed with NaCl secretbox under ``scrypt(password, salt)``.
* a blob signature: base64 of the ASN.1 DER ECDSA-P256 signature over SHA-256 of the exact bytes.

A key id is ``sha256:<hex>`` of the DER SubjectPublicKeyInfo. Nothing here logs or returns key
material or passwords.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from controlplane.errors import RefusedError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey, EllipticCurvePublicKey

PEM_TYPE = "ENCRYPTED SIGSTORE PRIVATE KEY"
PEM_TYPES = (PEM_TYPE, "ENCRYPTED COSIGN PRIVATE KEY")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 32768, 8, 1
_MAX_N, _MAX_R, _MAX_P = 1 << 18, 16, 16  # a key file must not make us allocate gigabytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pem(kind: str, body: bytes) -> bytes:
    text = _b64(body)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return (f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n").encode("ascii")


def _unpem(data: bytes) -> tuple[str, bytes]:
    text = data.decode("ascii", "replace").strip()
    lines = text.splitlines()
    if len(lines) < 3 or not lines[0].startswith("-----BEGIN ") or not lines[-1].startswith("-----END "):
        raise UsageError("key-invalid", "the private key file is not PEM", hint="pass a cosign.key file")
    kind = lines[0][len("-----BEGIN ") :].rstrip("-")
    try:
        body = base64.b64decode("".join(lines[1:-1]), validate=True)
    except binascii.Error as exc:
        raise UsageError("key-invalid", f"the private key's PEM body is not base64: {exc}") from exc
    return kind, body


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=128 * n * r * p + (32 << 20), dklen=32)


def generate_keypair(password: bytes) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key pair as (encrypted ``cosign.key`` PEM, ``cosign.pub`` PEM)."""
    import nacl.secret
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt, nonce = os.urandom(32), os.urandom(nacl.secret.SecretBox.NONCE_SIZE)
    box = nacl.secret.SecretBox(_scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))
    sealed = box.encrypt(pkcs8, nonce).ciphertext
    # Same field order and compact form as cosign's Go encoder (struct order, no spaces).
    doc = {
        "kdf": {
            "name": "scrypt",
            "params": {"N": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
            "salt": _b64(salt),
        },
        "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
        "ciphertext": _b64(sealed),
    }
    body = json.dumps(doc, separators=(",", ":")).encode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _pem(PEM_TYPE, body), public


def _field(doc: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(doc, dict) or name not in doc:
            raise UsageError("key-invalid", f"the encrypted key has no field {'.'.join(path)}")
        doc = doc[name]
    return doc


def load_private_key(data: bytes, password: bytes) -> EllipticCurvePrivateKey:
    """Open an encrypted cosign key (either PEM type).

    Raises ``UsageError('key-password-wrong')`` when the password does not open it and
    ``UsageError('key-invalid')`` for a file that is not a cosign ECDSA P-256 key.
    """
    import nacl.exceptions
    import nacl.secret
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    kind, body = _unpem(data)
    if kind not in PEM_TYPES:
        raise UsageError(
            "key-invalid",
            f"expected an encrypted cosign key, got PEM type {kind!r}",
            hint="generate one with `avm keys release-init` or `cosign generate-key-pair`",
            details={"expected": list(PEM_TYPES), "actual": kind},
        )
    try:
        doc = json.loads(body)
        if _field(doc, "kdf", "name") != "scrypt" or _field(doc, "cipher", "name") != "nacl/secretbox":
            raise UsageError("key-invalid", "the encrypted key uses an unsupported KDF or cipher")
        n, r, p = (int(_field(doc, "kdf", "params", k)) for k in ("N", "r", "p"))
        if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 0 < r <= _MAX_R and 0 < p <= _MAX_P):
            raise UsageError("key-invalid", f"the encrypted key's scrypt parameters are out of range: N={n}")
        salt = base64.b64decode(_field(doc, "kdf", "salt"), validate=True)
        nonce = base64.b64decode(_field(doc, "cipher", "nonce"), validate=True)
        sealed = base64.b64decode(_field(doc, "ciphertext"), validate=True)
    except (ValueError, TypeError) as exc:
        raise UsageError("key-invalid", f"the encrypted key's JSON body is malformed: {exc}") from exc
    if len(nonce) != nacl.secret.SecretBox.NONCE_SIZE:
        raise UsageError("key-invalid", f"the encrypted key's nonce has {len(nonce)} bytes, not 24")
    try:
        pkcs8 = nacl.secret.SecretBox(_scrypt(password, salt, n, r, p)).decrypt(sealed, nonce)
    except nacl.exceptions.CryptoError:
        # secretbox cannot tell a wrong password from a corrupted ciphertext; the password is likelier
        raise UsageError(
            "key-password-wrong",
            "the password does not open this cosign key",
            hint="set COSIGN_PASSWORD to the password the key was created with",
        ) from None
    key = serialization.load_der_private_key(pkcs8, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise UsageError("key-invalid", "the cosign key is not an ECDSA P-256 key")
    return key


def sign_blob(private_key: EllipticCurvePrivateKey, data: bytes) -> str:
    """``cosign sign-blob --key`` output for ``data``: base64 DER ECDSA-P256/SHA-256."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return _b64(private_key.sign(data, ec.ECDSA(hashes.SHA256())))


def load_public_key(public_pem: bytes) -> EllipticCurvePublicKey:
    """Raises ``UsageError('key-invalid')`` unless ``public_pem`` is a PKIX ECDSA P-256 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError) as exc:
        raise UsageError(
            "key-invalid", f"not a PEM public key: {exc}", hint="pass a cosign.pub file"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise UsageError(
            "key-invalid",
            "the public key is not ECDSA P-256 (cosign's key type)",
            details={"expected": "ECDSA P-256", "actual": type(key).__name__},
        )
    return key


def verify_blob(public_pem: bytes, data: bytes, signature_b64: str) -> None:
    """Check a ``cosign sign-blob`` signature over the exact bytes ``data``.

    Raises ``RefusedError('signature-invalid')`` when the signature is malformed or does not
    verify, ``UsageError('key-invalid')`` for a key that is not ECDSA P-256.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = load_public_key(public_pem)
    try:
        signature = base64.b64decode("".join(signature_b64.split()), validate=True)
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, InvalidSignature):
        raise RefusedError(
            "signature-invalid",
            f"the signature does not verify with key {public_key_id(public_pem)} over these bytes",
            hint="the bytes were altered after signing, or they were signed by another key",
            details={"keyid": public_key_id(public_pem), "data_sha256": hashlib.sha256(data).hexdigest()},
        ) from None


def public_key_id(public_pem: bytes) -> str:
    """``sha256:<hex>`` of the DER SubjectPublicKeyInfo of a PEM public key."""
    from cryptography.hazmat.primitives import serialization

    der = load_public_key(public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def public_pem_of(private_key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
