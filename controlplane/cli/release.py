"""avm sign: sign the release bundle of an exact commit (cosign sign-blob compatible)."""

from __future__ import annotations

from pathlib import Path

import click

from controlplane.cli.app import AppContext, pass_app


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
    required=True,
    help="Encrypted cosign.key; its password comes from $COSIGN_PASSWORD.",
)
@click.option(
    "--bundle-out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the signed bundle tar here (for `cosign verify-blob`).",
)
@pass_app
def sign(app: AppContext, repo: Path, ref: str, key_path: Path, bundle_out: Path | None) -> None:
    """Sign the release bundle of an exact commit (cosign sign-blob compatible).

    \b
    The bundle is a deterministic tar of the commit's files, rebuilt identically at promotion.
    Stores signatures/<sha>.json and <sha>.sig under --home and writes a `sign` receipt.
    Check with cosign: cosign verify-blob --key cosign.pub --signature <sha>.sig BUNDLE
    """
    from controlplane import signing

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


commands = [sign]
