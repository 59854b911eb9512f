"""The egress CA: its key stays 0600 in a 0700 directory, a leaf carries exactly its name, a
broken or exposed CA is refused rather than silently replaced."""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from controlplane.boundary.ca import EgressCA
from controlplane.errors import OperationalError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_created_once_with_a_root_only_key(tmp_path: Path) -> None:
    ca = EgressCA.ensure(tmp_path / "ca")
    assert _mode(tmp_path / "ca") == 0o700
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600
    again = EgressCA.ensure(tmp_path / "ca")
    assert again.fingerprint == ca.fingerprint
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_leaf_names_exactly_its_host_and_chains_to_the_ca(tmp_path: Path) -> None:
    ca = EgressCA.ensure(tmp_path / "ca")
    cert_path, key_path = ca.leaf("*.example.com")
    assert _mode(key_path) == 0o600
    leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["*.example.com"]
    leaf.verify_directly_issued_by(ca.cert)
    assert ca.leaf("*.example.com") == (cert_path, key_path)  # reused, not re-minted
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))  # a TLS stack accepts the CA
    assert len(ctx.get_ca_certs()) == 1


def test_bundle_is_the_system_store_plus_the_ca(tmp_path: Path) -> None:
    ca = EgressCA.ensure(tmp_path / "ca")
    system = tmp_path / "system.pem"
    system.write_bytes(b"# system store\n")
    assert ca.bundle(system) == b"# system store\n" + ca.cert_path.read_bytes()


def test_an_exposed_key_is_refused(tmp_path: Path) -> None:
    EgressCA.ensure(tmp_path / "ca")
    os.chmod(tmp_path / "ca" / "ca.key", 0o644)
    with pytest.raises(OperationalError) as err:
        EgressCA.ensure(tmp_path / "ca")
    assert err.value.code == "egress-ca-invalid"
    assert err.value.details == {"expected": "0o600", "actual": "0o644"}


def test_half_a_ca_is_refused_not_replaced(tmp_path: Path) -> None:
    ca = EgressCA.ensure(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").unlink()
    with pytest.raises(OperationalError) as err:
        EgressCA.ensure(tmp_path / "ca")
    assert err.value.code == "egress-ca-invalid"
    assert ca.cert_path.exists() and not (tmp_path / "ca" / "ca.key").exists()
