"""avm receipts: the auditor's evidence trail."""

from __future__ import annotations

import click

from controlplane.cli.pending import not_built


@click.group("receipts")
def receipts() -> None:
    """List, show, verify and export the signed, hash-chained evidence receipts."""


@receipts.command("verify")
def verify() -> None:
    """Verify every signature and the hash chain."""
    not_built("receipts verify", "the foundation")


commands = [receipts]
