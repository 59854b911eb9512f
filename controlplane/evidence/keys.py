"""The receipt signing key: ed25519, created once per avm home, private half 0600.

The public key's id is ``sha256:<hex>`` of its raw 32 bytes; receipts name the key by that id,
and ``avm receipts verify --key PUB`` trusts exactly the keys it is given.

Layout under ``keys/``::

    receipt-signing.key   PKCS#8 PEM, mode 0600 (never leaves this directory)
    receipt-signing.pub   SubjectPublicKeyInfo PEM (give this to auditors)
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane._internal.fs import write_new
from controlplane.errors import OperationalError, RefusedError, UsageError
from controlplane.home import Home

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_NAME = "receipt-signing.key"
PUBLIC_NAME = "receipt-signing.pub"


def key_id(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclasses.dataclass(frozen=True)
class Signer:
    private: Ed25519PrivateKey
    keyid: str

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


@dataclasses.dataclass(frozen=True)
class TrustedKeys:
    """Public keys a verifier accepts, by key id. Empty trust is refused, never "accept all"."""

    keys: dict[str, Ed25519PublicKey]

    def verify(self, keyid: str, signature: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self.keys[keyid].verify(signature, data)
        except InvalidSignature:
            return False
        return True


def private_path(home: Home) -> Path:
    return home.keys / PRIVATE_NAME


def public_path(home: Home) -> Path:
    return home.keys / PUBLIC_NAME


def init(home: Home) -> tuple[str, Path]:
    """Create the signing key pair. Returns (key id, public key path).

    Raises ``RefusedError('key-exists')`` if a key is already there: replacing it would cut the
    chain's trust, so it is never overwritten.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    home.ensure()
    priv_path = private_path(home)
    if priv_path.exists():
        raise RefusedError(
            "key-exists",
            f"a receipt signing key already exists at {priv_path}",
            hint="keys are never overwritten; use another --home for a new chain",
            details={"path": str(priv_path)},
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_new(priv_path, pem, 0o600)  # two concurrent `keys init` cannot both win
    pub = key.public_key()
    public_path(home).write_bytes(
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key_id(pub), public_path(home)


def load_signer(home: Home) -> Signer:
    """The home's signing key. Raises ``OperationalError('key-missing')`` before any step runs."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = private_path(home)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise OperationalError(
            "key-missing",
            f"no receipt signing key at {path}; every step must write a signed receipt",
            hint="run `avm keys init` once for this home",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError("key-invalid", f"{path} is not an ed25519 private key")
    return Signer(private=key, keyid=key_id(key.public_key()))


def load_trusted(paths: list[Path]) -> TrustedKeys:
    """Load public keys (PEM) to trust. Raises ``UsageError`` for an unreadable or wrong key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not paths:
        raise UsageError("no-trusted-key", "no public key to verify against", hint="pass --key PUB.pem")
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            pub = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UsageError(
                "key-unreadable",
                f"cannot read public key {path}: {exc}",
                hint="pass the receipt-signing.pub PEM file of the chain's signer",
            ) from exc
        if not isinstance(pub, Ed25519PublicKey):
            raise UsageError("key-unreadable", f"{path} is not an ed25519 public key")
        keys[key_id(pub)] = pub
    return TrustedKeys(keys)


def load_own_trusted(home: Home) -> TrustedKeys:
    """Trust this home's own receipt key (the default of ``avm receipts verify``).

    Raises ``UsageError('no-trusted-key')`` when the home has no receipt key yet, saying how to
    make one, instead of a bare "No such file or directory"."""
    path = public_path(home)
    if not path.exists():
        raise UsageError(
            "no-trusted-key",
            f"there is no receipt key in {home.root} yet, so there is nothing to verify against",
            hint="`avm keys init` makes this home's receipt key; to check another chain, "
            "pass its signer's public key with --key receipt-signing.pub",
            details={"expected": f"a public key at {path}", "actual": "no such file"},
        )
    return load_trusted([path])
