"""avm keys: the receipt signing key."""

from __future__ import annotations

import click

from controlplane.cli.app import AppContext, pass_app


@click.group("keys")
def keys() -> None:
    """Create and show the receipt signing key (ed25519, private half 0600 under keys/)."""


@keys.command("init")
@pass_app
def init(app: AppContext) -> None:
    """Create the receipt signing key and write the first receipt, `key-created`.

    \b
    The key is never overwritten (exit 3 if one exists). Give keys/receipt-signing.pub to
    auditors: `avm receipts verify --key receipt-signing.pub` trusts exactly that key.
    """
    from controlplane import evidence
    from controlplane import keys as keystore

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
    from controlplane import keys as keystore

    home = app.home
    signer = keystore.load_signer(home)
    pub = keystore.public_path(home)
    app.emit({"keyid": signer.keyid, "public_key": str(pub)}, f"{signer.keyid}\n{pub}")


commands = [keys]
