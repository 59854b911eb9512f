"""avm sign: sign the release bundle of an exact commit (cosign sign-blob compatible)."""

from __future__ import annotations

from pathlib import Path

import click

from controlplane.cli.app import AppContext, pass_app
from controlplane.errors import UsageError


@click.command("sign")
@click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=Path("."),
    show_default=True,
    help="The agent repository.",
)
@click.option("--commit", "ref", required=True, help="Commit SHA, tag or branch; resolved to a full SHA.")
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Encrypted cosign.key; its password comes from $COSIGN_PASSWORD.",
)
@click.option(
    "--sigstore-bundle",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Instead of --key: a Sigstore bundle (v0.1-v0.3, keyless or key-pair) made elsewhere "
    "(e.g. CI) over this commit's bundle tar; verified offline, then stored.",
)
@click.option(
    "--bundle-out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the signed bundle tar here (for `cosign verify-blob`).",
)
@pass_app
def sign(
    app: AppContext,
    repo: Path,
    ref: str,
    key_path: Path | None,
    sigstore_bundle: Path | None,
    bundle_out: Path | None,
) -> None:
    """Sign the release bundle of an exact commit (cosign sign-blob compatible).

    \b
    The bundle is a deterministic tar of the commit's files, rebuilt identically at promotion.
    Stores signatures/<sha>.json and <sha>.sig under --home and writes a `sign` receipt.
    Check with cosign: cosign verify-blob --key cosign.pub --signature <sha>.sig BUNDLE
    With only --bundle-out: writes the bundle tar to sign elsewhere, and signs nothing.
    With --sigstore-bundle: stores signatures/<sha>.sigstore.json once it verifies against the
    trusted identities (avm keys trust --sigstore-identity) or release keys; exit 3 otherwise.
    """
    from controlplane.release import trust as signing

    if key_path is None and sigstore_bundle is None and bundle_out is not None:
        _export_bundle(app, repo, ref, bundle_out)  # to be signed elsewhere (e.g. Sigstore in CI)
        return
    if (key_path is None) == (sigstore_bundle is None):
        raise UsageError(
            "sign-how",
            "pass exactly one of --key cosign.key or --sigstore-bundle FILE (or only --bundle-out)",
        )
    if sigstore_bundle is not None:
        _import_bundle(app, repo, ref, sigstore_bundle)
        return
    assert key_path is not None

    signed = signing.sign_release(
        app.home, repo, ref, key_path, signing.password_from_env(), bundle_out=bundle_out
    )
    doc = {
        "commit": signed.commit,
        "bundle_digest": signed.bundle_digest,
        "bundle_bytes": signed.bundle_size,
        "files": signed.files,
        "keyid": signed.keyid,
        "signature": signed.signature,
        "signature_path": str(signed.signature_path),
        "sig_path": str(signed.sig_path),
        "bundle_path": str(signed.bundle_path) if signed.bundle_path else None,
        "receipt": signed.receipt_id,
    }
    lines = [
        f"commit:    {signed.commit}",
        f"bundle:    {signed.bundle_digest} ({signed.files} files, {signed.bundle_size} bytes)",
        f"key:       {signed.keyid}",
        f"signature: {signed.signature_path}",
        f"           {signed.sig_path} (cosign verify-blob --signature)",
    ]
    if signed.bundle_path:
        lines.append(f"bundle:    {signed.bundle_path}")
    lines.append(f"receipt #{signed.receipt_id} (sign)")
    app.emit(doc, "\n".join(lines))


def _export_bundle(app: AppContext, repo: Path, ref: str, out: Path) -> None:
    from controlplane._internal.fs import write_atomic
    from controlplane.release import bundle, git

    sha = git.resolve(repo, ref)
    built = bundle.build(repo, sha)
    write_atomic(out, built.data, mode=0o644)
    doc = {"commit": sha, "bundle_digest": built.digest, "bundle_path": str(out)}
    app.emit(
        doc, f"commit: {sha}\nbundle: {built.digest}\nwrote {out} (sign it, then avm sign --sigstore-bundle)"
    )


def _import_bundle(app: AppContext, repo: Path, ref: str, bundle_file: Path) -> None:
    from controlplane.release import sigstoretrust

    verified, path, receipt = sigstoretrust.import_release_bundle(app.home, repo, ref, bundle_file)
    doc = {"method": verified.method, **verified.material, "path": str(path), "receipt": receipt}
    app.emit(doc, f"verified {sigstoretrust.describe(verified)}\nstored {path}\nreceipt #{receipt} (sign)")


@click.command("verify-bundle")
@click.argument("artifact", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--bundle",
    "bundle_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="The Sigstore bundle (JSON) over ARTIFACT.",
)
@click.option("--commit", default=None, help="The commit a CI identity (--repository) must name.")
@click.option(
    "--trusted-root",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="A Sigstore trusted_root.json for a private instance [default: the one avm ships].",
)
@pass_app
def verify_bundle(
    app: AppContext, artifact: Path, bundle_file: Path, commit: str | None, trusted_root: Path | None
) -> None:
    """Verify a Sigstore bundle over a file offline, with this home's trust (exit 3 if refused).

    \b
    Keyless bundles: a trusted identity (avm keys trust --sigstore-identity) and the trusted
    root. Key-pair bundles: a trusted release key (avm keys trust --release), with the
    transparency-log entry checked when present. The receipt records the trust material.
    Codes (exit 3): sigstore-bundle-malformed, -bundle-unsupported, -certificate-invalid,
    -sct-invalid, -time-unverified, -signature-invalid, -tlog-invalid, -tlog-mismatch,
    -tlog-untrusted, -entry-unsupported, -identity-untrusted, -identity-mismatch,
    -digest-mismatch, -key-untrusted, -trusted-root-invalid (all prefixed sigstore-).
    """
    from controlplane.canonical import sha256_digest
    from controlplane.evidence import step as evidence
    from controlplane.release import sigstoretrust

    data = artifact.read_bytes()
    inputs = {
        "artifact": str(artifact),
        "bundle": str(bundle_file),
        "commit": commit,
        "trusted_root": str(trusted_root) if trusted_root else None,
    }
    with evidence.record_step(app.home, "bundle-verify", inputs=inputs) as step:
        step.subject(f"file:{artifact.name}", sha256_digest(data))
        verified = sigstoretrust.verify_blob(
            app.home, data, bundle_file.read_bytes(), commit=commit, trusted_root=trusted_root
        )
        step.event(
            "gate.decision", gate="signature", outcome="pass", method=verified.method, **verified.material
        )
        step.result["trust"] = {"method": verified.method, **verified.material}
    doc = {"ok": True, "method": verified.method, **verified.material, "receipt": step.receipt_id}
    app.emit(doc, f"ok: {sigstoretrust.describe(verified)}\nreceipt #{step.receipt_id} (bundle-verify)")


commands = [sign, verify_bundle]
