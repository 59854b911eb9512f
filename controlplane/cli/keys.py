"""avm keys: signing keys for receipts."""

from __future__ import annotations

import click

from controlplane.cli.pending import not_built


@click.group("keys")
def keys() -> None:
    """Create and list signing keys (receipt, release and approver keys)."""


@keys.command("init")
def init() -> None:
    """Create the receipt signing key and the first receipt."""
    not_built("keys init", "the foundation")


commands = [keys]
