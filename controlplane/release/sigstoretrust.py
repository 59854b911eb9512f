"""Who may sign with Sigstore, and the bundles stored for releases. Offline.

Layout under the avm home::

    keys/sigstore-trusted/NAME.json   {"identity", "issuer", "repository"}: a keyless signer
                                      trusted explicitly (`avm keys trust --sigstore-identity`)
    signatures/<sha>.sigstore.json    a Sigstore bundle over the release bundle tar of <sha>,
                                      verified when stored (`avm sign --sigstore-bundle`) and
                                      again at every promotion

Key-pair bundles are checked against the same release keys as plain cosign signatures
(keys/release-trusted/).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane.errors import OperationalError, RefusedError, UsageError
from controlplane.evidence import step as evidence
from controlplane.home import Home
from controlplane.ids import parse_commit
from controlplane.release import git
from controlplane.release import trust as signing
from controlplane.release.bundle import Bundle
from controlplane.release.bundle import build as build_bundle
from controlplane.release.sigstorebundle import TrustedIdentity, Verified, verify

TRUSTED_DIR = "sigstore-trusted"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9._-]{1,100}$")


def identities_dir(home: Home) -> Path:
    return home.keys / TRUSTED_DIR


def bundle_path(home: Home, sha: str) -> Path:
    return signing.signatures_dir(home) / f"{parse_commit(sha)}.sigstore.json"


def trust_identity(
    home: Home, identity: str, issuer: str, repository: str | None, name: str | None
) -> tuple[str, Path, TrustedIdentity]:
    """Record a trusted keyless signer. Refuses to overwrite another policy of the same name."""
    if not identity.strip() or not issuer.startswith("https://"):
        raise UsageError(
            "sigstore-identity-invalid",
            "an identity and an https:// issuer are required",
            details={"identity": identity, "issuer": issuer},
        )
    if repository is not None and not _REPO_RE.fullmatch(repository):
        raise UsageError("sigstore-repository-invalid", f"repository {repository!r} is not OWNER/NAME")
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", identity.split("://")[-1])[:48].strip("-.") or "identity"
    if not _NAME_RE.fullmatch(name):
        raise UsageError("sigstore-name-invalid", f"name {name!r} must be 1-64 of [A-Za-z0-9._-]")
    who = TrustedIdentity(identity=identity, issuer=issuer, repository=repository)
    path = identities_dir(home) / f"{name}.json"
    data = (json.dumps(who.to_dict(), indent=2, sort_keys=True) + "\n").encode()
    if path.exists() and path.read_bytes() != data:
        raise RefusedError(
            "sigstore-identity-exists",
            f"{path} already trusts another identity",
            hint="choose another --name",
            details={"path": str(path)},
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o644)
    return name, path, who


def trusted_identities(home: Home) -> list[TrustedIdentity]:
    out = []
    directory = identities_dir(home)
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            doc = json.loads(path.read_bytes())
            out.append(TrustedIdentity(doc["identity"], doc["issuer"], doc.get("repository")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OperationalError("sigstore-trust-corrupt", f"cannot read {path}: {exc}") from exc
    return out


def release_keys(home: Home) -> dict[str, bytes]:
    return {k.keyid: k.path.read_bytes() for k in signing.trusted_keys(home)}


def verify_blob(
    home: Home,
    artifact: bytes,
    raw: bytes,
    *,
    commit: str | None = None,
    trusted_root: Path | None = None,
    commit_required: bool = True,
) -> Verified:
    """Verify a bundle over ``artifact`` with this home's trust. Raises ``RefusedError``."""
    return verify(
        artifact,
        raw,
        identities=trusted_identities(home),
        release_keys=release_keys(home),
        commit=commit,
        trusted_root=trusted_root,
        commit_required=commit_required,
    )


def verify_release_bundle(home: Home, bundle: Bundle) -> Verified | None:
    """The stored Sigstore bundle of ``bundle.sha`` verified over the rebuilt bundle bytes, bound
    to exactly that commit; None when the release has no Sigstore bundle."""
    path = bundle_path(home, bundle.sha)
    if not path.exists():
        return None
    return verify_blob(home, bundle.data, path.read_bytes(), commit=bundle.sha)


def verify_signature_gate(home: Home, built: Bundle, step: evidence.Step) -> str:
    """Promotion's signature gate: the stored Sigstore bundle if the release has one, else the
    cosign key-pair signature. The gate event records the trust material used (key id, or
    identity + issuer + trusted-root digest). Returns a short description of the signer."""
    sigstore = verify_release_bundle(home, built)
    if sigstore is None:
        keyid = signing.verify_release(home, built)
        step.event("gate.decision", gate="signature", outcome="pass", keyid=keyid, method="cosign-key")
        return keyid
    step.event("gate.decision", gate="signature", outcome="pass", method=sigstore.method, **sigstore.material)
    return describe(sigstore)


def import_release_bundle(home: Home, repo: Path, ref: str, bundle_file: Path) -> tuple[Verified, Path, str]:
    """Verify a Sigstore bundle over the release bundle of ``ref`` and store it. Nothing is
    stored when it does not verify. Returns (what was verified, stored path, receipt id)."""
    sha = git.resolve(repo, ref)
    raw = bundle_file.read_bytes()
    inputs = {"commit": sha, "sigstore_bundle": str(bundle_file)}
    with evidence.record_step(home, "sign", inputs=inputs) as step:
        step.subject(f"commit:{sha}", f"sha1:{sha}")
        built = build_bundle(repo, sha)
        step.subject("bundle", built.digest)
        verified = verify_blob(home, built.data, raw, commit=sha)
        step.event(
            "gate.decision", gate="signature", outcome="pass", method=verified.method, **verified.material
        )
        path = bundle_path(home, sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, raw, mode=0o644)
        step.observe("stored", str(path))
        step.result["trust"] = {"method": verified.method, **verified.material}
    return verified, path, str(step.receipt_id)


def describe(verified: Verified) -> str:
    m = verified.material
    if verified.method == "sigstore-key":
        return f"sigstore key {m['keyid']}"
    return f"sigstore {m['identity']} ({m['issuer']}), trusted root {m['trusted_root']}"
