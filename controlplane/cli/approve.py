"""avm approve: sign an approval bound to one plan digest."""

from __future__ import annotations

import click

from controlplane.cli.pending import not_built


@click.command("approve")
def approve() -> None:
    """Approve exactly one plan digest with your own key (governance gates for L3+)."""
    not_built("approve", "the governance overlay")


commands = [approve]
