"""avm keys: the receipt signing key and the trusted release (cosign) keys."""

from __future__ import annotations

from pathlib import Path

import click

from controlplane.cli.app import AppContext, pass_app
from controlplane.errors import UsageError


@click.group("keys")
def keys() -> None:
    """Receipt signing key (ed25519, private half 0600 under keys/) and trusted release keys.

    \b
    Release keys are cosign key pairs (ECDSA P-256). Promotion accepts only signatures by keys
    trusted explicitly with `avm keys trust --release cosign.pub`; never "any key".
    """


@keys.command("init")
@pass_app
def init(app: AppContext) -> None:
    """Create the receipt signing key and write the first receipt, `key-created`.

    \b
    The key is never overwritten (exit 3 if one exists). Give keys/receipt-signing.pub to
    auditors: `avm receipts verify --key receipt-signing.pub` trusts exactly that key.
    """
    from controlplane.evidence import keys as keystore
    from controlplane.evidence import step as evidence

    home = app.home
    keyid, pub = keystore.init(home)
    with evidence.record_step(home, "key-created", inputs={"algorithm": "ed25519"}) as step:
        step.subject("receipt-signing-key", keyid)
        step.observe("public_key_path", str(pub))
        step.observe("private_key_mode", oct(keystore.private_path(home).stat().st_mode & 0o777))
        step.non_claim("the private key's storage medium was not inspected (plain file, not an HSM)")
    app.emit(
        {"keyid": keyid, "public_key": str(pub), "receipt": step.receipt_id},
        f"created receipt signing key {keyid}\npublic key: {pub}\nreceipt #{step.receipt_id} (key-created)",
    )


@keys.command("show")
@pass_app
def show(app: AppContext) -> None:
    """Print the signing key's id and where its public half is."""
    from controlplane.evidence import keys as keystore

    home = app.home
    signer = keystore.load_signer(home)
    pub = keystore.public_path(home)
    app.emit({"keyid": signer.keyid, "public_key": str(pub)}, f"{signer.keyid}\n{pub}")


@keys.command("release-init")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory for cosign.key (0600) and cosign.pub (0644).",
)
@pass_app
def release_init(app: AppContext, out_dir: Path) -> None:
    """Create a cosign-compatible release key pair, encrypted with $COSIGN_PASSWORD.

    \b
    Like `cosign generate-key-pair`: refuses to overwrite existing files (exit 3) and needs
    $COSIGN_PASSWORD set (it may be empty). Keep cosign.key out of git.
    """
    from controlplane.release import trust as signing

    keyid, key_path, pub_path = signing.release_init(out_dir, signing.password_from_env())
    app.emit(
        {"keyid": keyid, "private_key": str(key_path), "public_key": str(pub_path)},
        f"created release key {keyid}\nprivate key: {key_path} (encrypted)\npublic key:  {pub_path}\n"
        f"trust it where releases are verified: avm keys trust --release {pub_path}",
    )


@keys.command("trust")
@click.option(
    "--release",
    "pub_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="A cosign.pub (PKIX PEM, ECDSA P-256) to trust for release signatures and key-pair bundles.",
)
@click.option("--sigstore-identity", default=None, help="A keyless signer: the certificate's identity (SAN).")
@click.option("--issuer", default=None, help="With --sigstore-identity: the OIDC issuer URL it must carry.")
@click.option(
    "--repository",
    default=None,
    help="With --sigstore-identity, for CI signers: OWNER/REPO the certificate must name; the "
    "certificate must then also name exactly the commit being verified.",
)
@click.option("--name", default=None, help="Name for the key or identity [default: derived].")
@pass_app
def trust(
    app: AppContext,
    pub_file: Path | None,
    sigstore_identity: str | None,
    issuer: str | None,
    repository: str | None,
    name: str | None,
) -> None:
    """Trust a release signer: a cosign key pair (--release) or a keyless Sigstore identity.

    \b
    --release copies cosign.pub into keys/release-trusted/NAME.pub.
    --sigstore-identity ID --issuer URL [--repository OWNER/REPO] writes
    keys/sigstore-trusted/NAME.json; keyless bundles are verified offline against the trusted
    root avm ships (its digest is recorded in the receipt).
    """
    from controlplane.evidence import step as evidence
    from controlplane.release import trust as signing

    home = app.home
    if (pub_file is None) == (sigstore_identity is None):
        raise UsageError("trust-what", "pass exactly one of --release FILE or --sigstore-identity ID")
    if sigstore_identity is not None:
        _trust_identity(app, sigstore_identity, issuer, repository, name)
        return
    if issuer is not None or repository is not None:
        raise UsageError("trust-what", "--issuer and --repository go with --sigstore-identity")
    assert pub_file is not None
    with evidence.record_step(
        home, "release-key-trusted", inputs={"public_key": str(pub_file), "name": name}
    ) as step:
        trusted = signing.trust_release_key(home, pub_file, name)
        step.subject(f"release-key:{trusted.name}", trusted.keyid)
        step.observe("path", str(trusted.path))
    app.emit(
        {"name": trusted.name, "keyid": trusted.keyid, "path": str(trusted.path), "receipt": step.receipt_id},
        f"trusted release key {trusted.name} {trusted.keyid}\n{trusted.path}\nreceipt #{step.receipt_id}",
    )


def _trust_identity(
    app: AppContext, identity: str, issuer: str | None, repository: str | None, name: str | None
) -> None:
    from controlplane.canonical import canonical_bytes, sha256_hex
    from controlplane.evidence import step as evidence
    from controlplane.release import sigstorebundle, sigstoretrust

    if issuer is None:
        raise UsageError("sigstore-issuer-required", "--sigstore-identity needs --issuer URL")
    inputs = {"identity": identity, "issuer": issuer, "repository": repository, "name": name}
    with evidence.record_step(app.home, "sigstore-identity-trusted", inputs=inputs) as step:
        saved, path, who = sigstoretrust.trust_identity(app.home, identity, issuer, repository, name)
        _, root_digest = sigstorebundle.load_root(None)
        step.subject(f"sigstore-identity:{saved}", "sha256:" + sha256_hex(canonical_bytes(who.to_dict())))
        step.subject("sigstore-trusted-root", root_digest)
        step.observe("path", str(path))
        step.result.update({**who.to_dict(), "trusted_root": root_digest})
    doc = {
        "name": saved,
        **who.to_dict(),
        "trusted_root": root_digest,
        "path": str(path),
        "receipt": step.receipt_id,
    }
    app.emit(
        doc, f"trusted sigstore identity {saved}: {identity} ({issuer})\n{path}\nreceipt #{step.receipt_id}"
    )


@keys.command("list")
@pass_app
def list_(app: AppContext) -> None:
    """List the receipt signing key and the trusted release keys."""
    from controlplane.evidence import keys as keystore
    from controlplane.release import trust as signing

    home = app.home
    receipt_key = None
    if keystore.public_path(home).exists():
        receipt_key = {
            "keyid": keystore.load_signer(home).keyid,
            "path": str(keystore.public_path(home)),
        }
    release = [{"name": k.name, "keyid": k.keyid, "path": str(k.path)} for k in signing.trusted_keys(home)]
    lines = ["receipt signing key:"]
    lines.append(
        f"  {receipt_key['keyid']}  {receipt_key['path']}" if receipt_key else "  none (avm keys init)"
    )
    lines.append("trusted release keys:")
    lines += [f"  {k['name']:<24} {k['keyid']}" for k in release] or ["  none (avm keys trust --release PUB)"]
    app.emit({"receipt_key": receipt_key, "release_trusted": release}, "\n".join(lines))


@keys.command("approver-init")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory for approver.key (0600) and approver.pub.",
)
@pass_app
def approver_init(app: AppContext, out_dir: Path) -> None:
    """Create an approver's own ed25519 key pair (distinct from the promoter's receipt key)."""
    from controlplane.governance import approvals

    keyid, priv, pub = approvals.init_approver(out_dir)
    app.emit(
        {"keyid": keyid, "private_key": str(priv), "public_key": str(pub)},
        f"created approver key {keyid}\nprivate key: {priv}\npublic key:  {pub}\n"
        f"trust it where promotions are applied: avm keys approver-trust {pub}",
    )


@keys.command("approver-trust")
@click.argument("pub_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@pass_app
def approver_trust(app: AppContext, pub_file: Path) -> None:
    """Trust an approver's public key (refused for the home's own receipt-signing key)."""
    from controlplane.evidence import step as evidence
    from controlplane.governance import approvals

    home = app.home
    with evidence.record_step(home, "approver-trusted", inputs={"public_key": str(pub_file)}) as step:
        keyid, path = approvals.trust_approver(home, pub_file)
        step.subject("approver-key", keyid)
        step.observe("path", str(path))
    app.emit(
        {"keyid": keyid, "path": str(path), "receipt": step.receipt_id},
        f"trusted approver key {keyid}\n{path}\nreceipt #{step.receipt_id}",
    )


commands = [keys]
