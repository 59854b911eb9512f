"""Release trust and the signature store: who may sign releases, and what they signed. Offline.

Layout under the avm home::

    keys/release-trusted/NAME.pub   cosign.pub PEM files trusted to sign releases (explicit:
                                    `avm keys trust --release PUB.pem`; never "any key")
    signatures/<sha>.json           {"commit", "bundle_digest", "signature", "keyid"}
    signatures/<sha>.sig            the bare base64 signature, so that
                                    `cosign verify-blob --key cosign.pub --signature <sha>.sig bundle.tar`
                                    accepts it

What is signed is the exact bundle tar (``cosign sign-blob`` over its bytes); verifying rebuilds
the bundle from the commit and checks the signature over the rebuilt bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from controlplane._internal.fs import write_atomic, write_new
from controlplane.errors import OperationalError, RefusedError, UsageError
from controlplane.evidence import step as evidence
from controlplane.home import Home
from controlplane.ids import CommitSha, Digest, parse_commit
from controlplane.release import cosign, git
from controlplane.release.bundle import Bundle
from controlplane.release.bundle import build as build_bundle
from controlplane.release.manifest import MANIFEST_PATH, ReleaseManifest, parse_manifest

TRUSTED_DIR = "release-trusted"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def trusted_dir(home: Home) -> Path:
    return home.keys / TRUSTED_DIR


def signatures_dir(home: Home) -> Path:
    return home.root / "signatures"


def signature_path(home: Home, sha: str) -> Path:
    return signatures_dir(home) / f"{parse_commit(sha)}.json"


@dataclasses.dataclass(frozen=True)
class TrustedKey:
    name: str
    keyid: str
    path: Path


@dataclasses.dataclass(frozen=True)
class SignedRelease:
    commit: CommitSha
    bundle_digest: Digest
    bundle_size: int
    files: int
    signature: str  # base64 DER, as `cosign sign-blob` prints it
    keyid: str
    signature_path: Path  # <sha>.json
    sig_path: Path  # <sha>.sig (cosign verify-blob --signature)
    bundle_path: Path | None
    receipt_id: str | None


def password_from_env(env: str = "COSIGN_PASSWORD") -> bytes:
    """The key password from ``$COSIGN_PASSWORD``, as cosign reads it (empty is allowed, unset is
    not: avm never prompts). Raises ``UsageError('key-password-missing')``."""
    value = os.environ.get(env)
    if value is None:
        raise UsageError(
            "key-password-missing",
            f"${env} is not set",
            hint=f"export {env}=... (the cosign.key password); avm never prompts for it",
        )
    return value.encode("utf-8")


# -- trust ---------------------------------------------------------------------------------------


def release_init(out_dir: Path, password: bytes) -> tuple[str, Path, Path]:
    """Write a new cosign key pair: ``cosign.key`` (0600, encrypted) and ``cosign.pub`` (0644).

    Returns (key id, key path, pub path). Raises ``RefusedError('key-exists')`` if either file
    exists: a release key is never overwritten.
    """
    key_path, pub_path = out_dir / "cosign.key", out_dir / "cosign.pub"
    existing = [str(p) for p in (key_path, pub_path) if p.exists()]
    if existing:
        raise RefusedError(
            "key-exists",
            f"refusing to overwrite {', '.join(existing)}",
            hint="choose another --out directory; release keys are never overwritten",
            details={"paths": existing},
        )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_pem, public_pem = cosign.generate_keypair(password)
    write_new(key_path, private_pem, 0o600)
    write_new(pub_path, public_pem, 0o644)
    return cosign.public_key_id(public_pem), key_path, pub_path


def trust_release_key(home: Home, pub_file: Path, name: str | None = None) -> TrustedKey:
    """Copy a cosign.pub into ``keys/release-trusted/NAME.pub``. Idempotent for the same key.

    Raises ``UsageError('key-invalid')`` unless it is an ECDSA P-256 PEM public key,
    ``UsageError('key-name-invalid')`` for a bad name, ``RefusedError('key-exists')`` if NAME
    already holds a different key.
    """
    try:
        pem = pub_file.read_bytes()
    except OSError as exc:
        raise UsageError("key-unreadable", f"cannot read {pub_file}: {exc.strerror}") from exc
    keyid = cosign.public_key_id(pem)
    name = name or "release-" + keyid.removeprefix("sha256:")[:12]
    if not _NAME_RE.fullmatch(name):
        raise UsageError(
            "key-name-invalid",
            f"key name {name!r} is invalid",
            hint="1-64 of letters, digits, '.', '_', '-', starting with a letter or digit",
            details={"actual": name},
        )
    dest = trusted_dir(home) / f"{name}.pub"
    if dest.exists():
        current = cosign.public_key_id(dest.read_bytes())
        if current != keyid:
            raise RefusedError(
                "key-exists",
                f"a different release key is already trusted as {name!r}",
                hint="pick another --name; remove the old file by hand to revoke it",
                details={"expected": current, "actual": keyid},
            )
        return TrustedKey(name=name, keyid=keyid, path=dest)
    write_atomic(dest, pem, 0o644)
    return TrustedKey(name=name, keyid=keyid, path=dest)


def trusted_keys(home: Home) -> list[TrustedKey]:
    """The trusted release keys, by name. Raises ``UsageError('key-invalid')`` for a bad file."""
    directory = trusted_dir(home)
    if not directory.is_dir():
        return []
    return [
        TrustedKey(name=p.stem, keyid=cosign.public_key_id(p.read_bytes()), path=p)
        for p in sorted(directory.glob("*.pub"))
    ]


# -- sign ----------------------------------------------------------------------------------------


def sign_release(
    home: Home, repo: Path, ref: str, key_path: Path, password: bytes, *, bundle_out: Path | None = None
) -> SignedRelease:
    """Resolve ``ref``, check the commit's release manifest, build the bundle, sign its exact
    bytes, store the signature, write a ``sign`` receipt (even when refused).

    Nothing is signed for a commit that could never be promoted: ``RefusedError('manifest-missing')``
    without ``avm.yaml``, ``UsageError('manifest-invalid')`` when it does not validate (bad
    fields, or a profile name too long for its derived Linux user), and the ``artifact-*``
    refusals of ``verify_artifacts``. Also raises what ``git.resolve`` and ``bundle.build`` raise,
    ``UsageError('key-unreadable' | 'key-invalid' | 'key-password-wrong')``."""
    inputs = {"repo": str(repo), "ref": ref, "key": str(key_path)}
    with evidence.record_step(home, "sign", inputs=inputs) as step:
        sha = git.resolve(repo, ref)
        step.subject(f"commit:{sha}", f"sha1:{sha}")
        manifest = load_manifest(repo, sha)
        step.check("manifest-valid", ok=True, detail=f"{len(manifest.profiles)} profile(s)")
        try:
            key_bytes = key_path.read_bytes()
        except OSError as exc:
            raise UsageError(
                "key-unreadable", f"cannot read the signing key {key_path}: {exc.strerror}"
            ) from exc
        private = cosign.load_private_key(key_bytes, password)
        public_pem = cosign.public_pem_of(private)
        keyid = cosign.public_key_id(public_pem)
        built = build_bundle(repo, sha)
        step.subject("bundle", built.digest)
        verify_artifacts(manifest, built)
        signature = cosign.sign_blob(private, built.data)
        cosign.verify_blob(public_pem, built.data, signature)  # never store what does not verify
        record = {"commit": sha, "bundle_digest": built.digest, "signature": signature, "keyid": keyid}
        json_path = signature_path(home, sha)
        sig_path = json_path.with_suffix(".sig")
        write_atomic(sig_path, signature.encode("ascii"))
        write_atomic(json_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        if bundle_out is not None:
            write_atomic(bundle_out, built.data)
        trusted = keyid in {k.keyid for k in trusted_keys(home)}
        step.observe("keyid", keyid)
        step.observe("bundle_bytes", len(built.data))
        step.observe("bundle_files", len(built.files))
        step.observe("signature_path", str(json_path))
        step.check("signature-verifies", ok=True, detail="re-verified with the key's public half")
        step.check("key-trusted-here", ok=trusted, detail="key is in keys/release-trusted of this home")
        if not trusted:
            step.non_claim("this home does not trust the signing key; promotion from it will refuse")
        step.non_claim("the signature is not uploaded to a transparency log (cosign --tlog-upload=false)")
    return SignedRelease(
        commit=sha,
        bundle_digest=built.digest,
        bundle_size=len(built.data),
        files=len(built.files),
        signature=signature,
        keyid=keyid,
        signature_path=json_path,
        sig_path=sig_path,
        bundle_path=bundle_out,
        receipt_id=step.receipt_id,
    )


def load_manifest(repo: Path, sha: str) -> ReleaseManifest:
    """The validated ``avm.yaml`` of commit ``sha``: one rule for signing and for promotion.

    Raises ``RefusedError('manifest-missing')`` and ``UsageError('manifest-invalid')``."""
    raw = git.read_file(repo, sha, MANIFEST_PATH)
    if raw is None:
        raise RefusedError(
            "manifest-missing",
            f"commit {sha[:12]} has no {MANIFEST_PATH}",
            hint="add avm.yaml to the agent repo",
        )
    return parse_manifest(raw, source=f"{MANIFEST_PATH}@{sha[:12]}")


# -- verify --------------------------------------------------------------------------------------


def _load_record(home: Home, sha: str) -> dict[str, str]:
    path = signature_path(home, sha)
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RefusedError(
            "signature-missing",
            f"no stored signature for commit {sha}",
            hint="sign it first: avm sign --repo PATH --commit SHA --key cosign.key",
            details={"commit": sha, "path": str(path)},
        ) from None
    except (OSError, ValueError) as exc:
        raise OperationalError("signature-store-corrupt", f"cannot read {path}: {exc}") from exc
    fields = ("commit", "bundle_digest", "signature", "keyid")
    if not isinstance(raw, dict) or not all(isinstance(raw.get(f), str) for f in fields):
        raise OperationalError("signature-store-corrupt", f"{path} lacks one of {', '.join(fields)}")
    return {f: raw[f] for f in fields}


def verify_release(home: Home, bundle: Bundle) -> str:
    """Check the stored signature of ``bundle.sha`` against the trusted release keys and the
    exact bundle bytes. Returns the signer's key id.

    Raises ``RefusedError``: ``signature-missing`` (nothing stored for the commit),
    ``signature-untrusted-key`` (signer not in keys/release-trusted, or none trusted),
    ``bundle-digest-mismatch`` (the signed bundle is not the one rebuilt), ``signature-invalid``
    (the signature does not verify over these bytes, or the record is for another commit).
    """
    record = _load_record(home, bundle.sha)
    if record["commit"] != bundle.sha:
        raise RefusedError(
            "signature-invalid",
            f"the stored signature record for {bundle.sha[:12]} names commit {record['commit'][:12]}",
            details={"expected": bundle.sha, "actual": record["commit"]},
        )
    trusted = {k.keyid: k for k in trusted_keys(home)}
    if record["keyid"] not in trusted:
        raise RefusedError(
            "signature-untrusted-key",
            f"commit {bundle.sha[:12]} is signed by {record['keyid']}, which is not a trusted release key",
            hint="trust the release signer's cosign.pub explicitly: avm keys trust --release cosign.pub",
            details={"expected": sorted(trusted), "actual": record["keyid"]},
        )
    if record["bundle_digest"] != bundle.digest:
        raise RefusedError(
            "bundle-digest-mismatch",
            f"the signed bundle of {bundle.sha[:12]} is not the bundle rebuilt from the commit",
            hint="the repository content differs from what was signed; re-sign only if that is intended",
            details={"expected": record["bundle_digest"], "actual": bundle.digest},
        )
    cosign.verify_blob(trusted[record["keyid"]].path.read_bytes(), bundle.data, record["signature"])
    return record["keyid"]


def verify_artifacts(manifest: ReleaseManifest, bundle: Bundle) -> None:
    """Every artifact pinned in the manifest must be in the bundle with exactly its sha256.

    Raises ``RefusedError('artifact-missing')`` or ``RefusedError('artifact-digest-mismatch')``.
    """
    for artifact in manifest.artifacts:
        actual = bundle.files.get(artifact.path)
        if actual is None:
            raise RefusedError(
                "artifact-missing",
                f"pinned artifact {artifact.path} is not a file in commit {bundle.sha[:12]}",
                hint="commit the artifact, or fix its path in avm.yaml",
                details={"path": artifact.path, "expected": f"sha256:{artifact.sha256}", "actual": None},
            )
        if actual != f"sha256:{artifact.sha256}":
            raise RefusedError(
                "artifact-digest-mismatch",
                f"artifact {artifact.path} does not match its pinned digest",
                hint="the file changed after it was pinned; re-pin it in avm.yaml only if that is intended",
                details={"path": artifact.path, "expected": f"sha256:{artifact.sha256}", "actual": actual},
            )
