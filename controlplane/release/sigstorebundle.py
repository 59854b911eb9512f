"""Sigstore bundles (v0.1-v0.3), verified offline: keyless with sigstore-python, key pairs with avm.

Two kinds of signer, told apart by the bundle's verification material:

- **keyless** (a Fulcio certificate): verified by sigstore-python (the optional extra
  ``agent-vm[sigstore]``, imported only here) against the trusted root avm ships in
  ``controlplane/data/sigstore/trusted_root.json``, whose sha256 is pinned below and checked
  before use, never against a root fetched over the network. The certificate must match an
  identity the operator trusts (``avm keys trust --sigstore-identity ID --issuer URL``); a CI
  identity trusted with ``--repository OWNER/REPO`` must also carry that source repository and
  exactly the commit being verified (a bundle made for another commit is refused).
- **key pair** (a ``publicKey`` hint, from ``cosign sign-blob --key --bundle``): verified by
  avm's own code (``sigstorekeyed``) against the trusted release keys, with the transparency-log
  entry checked when present.

Each refusal is a ``RefusedError`` (exit 3) with one code:

==============================  ============================================================
sigstore-bundle-malformed       not JSON, or not a loadable bundle
sigstore-bundle-unsupported     a bundle media type or version avm does not know
sigstore-certificate-invalid    the signing certificate does not chain to a trusted CA at the
                                signing time (another instance, a time in the future)
sigstore-sct-invalid            the certificate's SCT does not verify with a trusted CT log
sigstore-time-unverified        no trusted source of time (log or TSA) vouches for the signature
sigstore-signature-invalid      the signature does not verify over the artifact / envelope
sigstore-tlog-invalid           the log entry's inclusion proof, checkpoint or SET is wrong
sigstore-tlog-mismatch          the log entry is for another artifact, signature or certificate
sigstore-entry-unsupported      a log entry kind sigstore-python cannot establish a time from
sigstore-bundle-invalid         sigstore-python refused the bundle for another reason (in the
                                message)
sigstore-identity-untrusted     keyless, and no Sigstore identity is trusted
sigstore-identity-mismatch      a valid bundle, but not from a trusted identity (or another
                                repository / commit)
sigstore-digest-mismatch        the bundle signs another artifact
sigstore-key-untrusted          key pair, and the signature verifies with no trusted key
sigstore-tlog-untrusted         key pair: the log entry is from a log not in the trusted root
sigstore-tlog-unsupported       key pair: a log entry kind avm does not check
sigstore-trusted-root-mismatch  the shipped trusted root is not the pinned file
sigstore-trusted-root-invalid   a trusted root sigstore-python cannot load (e.g. a log key
                                without a validity start)
sigstore-extra-missing          keyless verification needs ``pip install 'agent-vm[sigstore]'``
==============================  ============================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from controlplane.errors import AvmError, RefusedError, UsageError
from controlplane.release.sigstorekeyed import dsse_subject_matches, verify_keyed

# package data, read where the package is installed (never a copy fetched at run time)
SHIPPED_ROOT = Path(
    str(importlib.resources.files("controlplane") / "data" / "sigstore" / "trusted_root.json")
)
SHIPPED_ROOT_SHA256 = "6494e21ea73fa7ee769f85f57d5a3e6a08725eae1e38c755fc3517c9e6bc0b66"
MEDIA_TYPES = {
    "application/vnd.dev.sigstore.bundle+json;version=0.1": "0.1",
    "application/vnd.dev.sigstore.bundle+json;version=0.2": "0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.3": "0.3",
    "application/vnd.dev.sigstore.bundle.v0.3+json": "0.3",
}


@dataclasses.dataclass(frozen=True)
class TrustedIdentity:
    """A keyless signer the operator trusts; ``repository`` binds a CI signer to its source
    repository and to the exact commit being verified."""

    identity: str
    issuer: str
    repository: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Verified:
    """What a verification relied on; ``material`` goes into the receipt."""

    method: str  # "sigstore-keyless" or "sigstore-key"
    material: dict[str, Any]


def _refuse(code: str, message: str, **details: Any) -> RefusedError:
    return RefusedError(
        code, message, hint="the bundle does not prove what it claims; nothing was changed", details=details
    )


def load_root(path: Path | None) -> tuple[bytes, str]:
    """The trusted root's bytes and sha256. The shipped one must match its pinned digest."""
    data = (path or SHIPPED_ROOT).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if path is None and digest != SHIPPED_ROOT_SHA256:
        raise _refuse(
            "sigstore-trusted-root-mismatch",
            f"{SHIPPED_ROOT} is not the pinned trusted root",
            expected=SHIPPED_ROOT_SHA256,
            actual=digest,
        )
    return data, f"sha256:{digest}"


def parse(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse("sigstore-bundle-malformed", f"the bundle is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("verificationMaterial"), dict):
        raise _refuse("sigstore-bundle-malformed", "the bundle has no verificationMaterial")
    if doc.get("mediaType") not in MEDIA_TYPES:
        raise _refuse(
            "sigstore-bundle-unsupported",
            "unknown bundle media type",
            expected=sorted(MEDIA_TYPES),
            actual=doc.get("mediaType"),
        )
    return doc


def is_keyed(doc: Mapping[str, Any]) -> bool:
    return "publicKey" in doc["verificationMaterial"]


def verify(
    artifact: bytes,
    raw: bytes,
    *,
    identities: Sequence[TrustedIdentity],
    release_keys: Mapping[str, bytes],
    commit: str | None = None,
    trusted_root: Path | None = None,
    commit_required: bool = True,
) -> Verified:
    """Verify a Sigstore bundle over ``artifact``. Raises ``RefusedError`` (exit 3).

    A CI identity (``repository`` set) is checked against ``commit``; with
    ``commit_required=False`` (an image, which has no commit) only its repository is checked."""
    doc = parse(raw)
    root_bytes, root_digest = load_root(trusted_root)
    base = {
        "bundle": "sha256:" + hashlib.sha256(raw).hexdigest(),
        "bundle_version": MEDIA_TYPES[doc["mediaType"]],
        "trusted_root": root_digest,
        "trusted_root_source": "shipped" if trusted_root is None else str(trusted_root),
    }
    if is_keyed(doc):
        keyid, checked = verify_keyed(doc, artifact, release_keys, json.loads(root_bytes))
        return Verified("sigstore-key", {**base, "keyid": keyid, **checked})
    who = _verify_keyless(
        artifact, raw, doc, identities, commit, trusted_root or SHIPPED_ROOT, commit_required
    )
    return Verified(
        "sigstore-keyless", {**base, **who.to_dict(), "commit": commit if who.repository else None}
    )


def _policy(who: TrustedIdentity, commit: str | None, commit_required: bool) -> Any:
    from sigstore.verify import policy

    rules: list[Any] = [policy.Identity(identity=who.identity, issuer=who.issuer)]
    if who.repository is not None:
        if commit is None and commit_required:
            raise UsageError(
                "sigstore-commit-required", "a CI identity is bound to a commit: pass the commit"
            )
        rules.append(policy.GitHubWorkflowRepository(who.repository))
        if commit is not None:
            rules.append(policy.GitHubWorkflowSHA(commit))
    return policy.AllOf(rules)


def _verify_keyless(
    artifact: bytes,
    raw: bytes,
    doc: Mapping[str, Any],
    identities: Sequence[TrustedIdentity],
    commit: str | None,
    root_path: Path,
    commit_required: bool,
) -> TrustedIdentity:
    try:
        from sigstore.models import Bundle, TrustedRoot
        from sigstore.verify import Verifier, policy
    except ImportError as exc:
        raise UsageError(
            "sigstore-extra-missing",
            "keyless bundles need the sigstore extra",
            hint="pip install 'agent-vm[sigstore]'",
        ) from exc
    try:
        bundle = Bundle.from_json(raw)
    except Exception as exc:  # sigstore-python raises several types for a bad bundle
        raise _refuse("sigstore-bundle-malformed", f"not a loadable bundle: {exc}".splitlines()[0]) from exc
    try:
        verifier = Verifier(trusted_root=TrustedRoot.from_file(str(root_path)))
    except Exception as exc:  # sigstore-python's own errors for a bad root
        raise _refuse("sigstore-trusted-root-invalid", f"{root_path}: {exc}".splitlines()[0]) from exc

    def run(rule: Any) -> None:
        if "dsseEnvelope" in doc:
            payload_type, payload = verifier.verify_dsse(bundle, rule)
            if payload_type != "application/vnd.in-toto+json" or not dsse_subject_matches(payload, artifact):
                raise _refuse(
                    "sigstore-digest-mismatch", "no in-toto subject of the envelope names the artifact"
                )
        else:
            verifier.verify_artifact(artifact, bundle, rule)

    if not identities:
        raise _refuse(
            "sigstore-identity-untrusted",
            "the bundle is keyless, and no Sigstore identity is trusted",
            hint="avm keys trust --sigstore-identity IDENTITY --issuer ISSUER",
        )
    reasons = []
    for who in identities:
        try:
            run(_policy(who, commit, commit_required))
            return who
        except AvmError:
            raise
        except Exception as exc:  # VerificationError, rfc3161-client's, pydantic's: all refusals
            reasons.append(f"{type(exc).__name__}: {exc}")
    # which failed: the bundle itself, or only the identity? Check the bundle without the policy.
    quiet = logging.getLogger("sigstore.verify.policy")
    was, quiet.disabled = quiet.disabled, True  # its "no-op policy" warning is expected here
    try:
        run(policy.UnsafeNoOp())
    except RefusedError:
        raise
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "digest mismatch" in message:
            raise _refuse(
                "sigstore-digest-mismatch", f"the bundle signs another artifact: {message}"
            ) from exc
        raise _refuse(_code_for(message), f"the bundle does not verify: {message}") from exc
    finally:
        quiet.disabled = was
    cert = bundle.signing_certificate
    raise _refuse(
        "sigstore-identity-mismatch",
        "a valid bundle, but not from a trusted identity",
        expected=[w.to_dict() for w in identities],
        actual=_cert_identity(cert),
        reasons=reasons[:3],
    )


# sigstore-python's reasons, mapped to avm's codes (first match wins; the reason stays in the message)
_REASONS = (
    ("Integrated time only supported", "sigstore-entry-unsupported"),
    ("invalid log entry", "sigstore-tlog-invalid"),
    ("inconsistent with other materials", "sigstore-tlog-mismatch"),
    ("log entry payload hash does not match", "sigstore-tlog-mismatch"),
    ("log entry signatures do not match", "sigstore-tlog-mismatch"),
    ("SCT", "sigstore-sct-invalid"),
    ("timestamp certificate chain", "sigstore-certificate-invalid"),
    ("not enough sources of verified time", "sigstore-time-unverified"),
    ("invalid signature", "sigstore-signature-invalid"),
    ("Signature is invalid", "sigstore-signature-invalid"),
)


def _code_for(message: str) -> str:
    return next((code for needle, code in _REASONS if needle in message), "sigstore-bundle-invalid")


def _cert_identity(cert: Any) -> dict[str, Any]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
        names += [str(v) for v in san.get_values_for_type(x509.RFC822Name)]
    except x509.ExtensionNotFound:
        names = []
    return {"san": names}
