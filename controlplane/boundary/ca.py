"""The per-host egress CA: the sandboxes trust it, the gateway presents a leaf of it per listed name.

``EgressCA.ensure(dir)`` creates the CA once (P-256; key file 0600 in a 0700 directory, both
owned by root) or loads it; ``leaf(name)`` mints (or reuses) the leaf of one listed name, with
that name as its only SAN, for the gateway's filter chain of that name. The CA key never leaves
``dir``; sandboxes get only ``ca.pem`` (``bundle()``: the system store plus the CA).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane._internal.fs import write_atomic
from controlplane.canonical import sha256_digest
from controlplane.errors import OperationalError

CA_DAYS = 3650
LEAF_DAYS = 90
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(frozen=True)
class EgressCA:
    dir: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the CA certificate's DER: what status and receipts record."""
        return sha256_digest(self.cert.public_bytes(serialization.Encoding.DER))

    @classmethod
    def ensure(cls, directory: Path, *, common_name: str = "avm egress CA") -> EgressCA:
        """Load the CA in ``directory`` or create it. Raises ``OperationalError('egress-ca-invalid')``
        if only half of it exists or its key is readable by anyone but its owner."""
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() != cert_path.exists():
            raise OperationalError(
                "egress-ca-invalid",
                f"egress CA in {directory}: expected ca.key and ca.pem, found only one",
                hint="restore the missing file, or remove the directory to mint a new CA "
                "(sandboxes must then trust the new one)",
            )
        if key_path.exists():
            mode = stat.S_IMODE(key_path.stat().st_mode)
            if mode & 0o077:
                raise OperationalError(
                    "egress-ca-invalid",
                    f"egress CA key {key_path}: expected mode 0600, got {oct(mode)}",
                    hint=f"chmod 600 {key_path}",
                    details={"expected": "0o600", "actual": oct(mode)},
                )
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(directory, x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        write_atomic(key_path, _pem_key(key), 0o600)
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(directory, cert, key)

    def leaf(self, host: str) -> tuple[Path, Path]:
        """(cert, key) paths of the leaf for ``host`` (a listed name, ``*.`` wildcards too),
        minted now if missing or issued by another CA. The key is 0600."""
        safe = host.replace("*", "_star_")
        cert_path, key_path = self.dir / "leaves" / f"{safe}.pem", self.dir / "leaves" / f"{safe}.key"
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.issuer == self.cert.subject and cert.not_valid_after_utc > _now() + datetime.timedelta(
                days=7
            ):
                return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        write_atomic(key_path, _pem_key(key), 0o600)
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cert_path, key_path

    def bundle(self, system: Path = SYSTEM_BUNDLE) -> bytes:
        """The trust bundle a sandbox gets: the system store (if present) followed by this CA."""
        own = self.cert.public_bytes(serialization.Encoding.PEM)
        return (system.read_bytes() if system.exists() else b"") + own
