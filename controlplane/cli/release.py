"""avm sign / promote / status / rollback: the Tier-1 promotion control plane."""

from __future__ import annotations

import click

from controlplane.cli.pending import not_built


@click.command("sign")
def sign() -> None:
    """Sign a release bundle of an exact commit (cosign sign-blob compatible)."""
    not_built("sign", "Tier-1 promotion")


@click.command("promote")
def promote() -> None:
    """Promote an exact commit to a target: dry-run plan by default, --apply to execute it."""
    not_built("promote", "Tier-1 promotion")


@click.command("status")
def status() -> None:
    """Re-derive the live state of a target and report drift (exit 0 in sync, 2 drift, 1 error)."""
    not_built("status", "Tier-1 promotion")


@click.command("rollback")
def rollback() -> None:
    """Roll back to the release recorded before the last promotion (dry-run by default)."""
    not_built("rollback", "Tier-1 promotion")


commands = [sign, promote, status, rollback]
