"""avm job: Tier-2 microVM jobs."""

from __future__ import annotations

import click

from controlplane.cli.pending import not_built


@click.group("job")
def job() -> None:
    """Run Tier-2 jobs in ephemeral microVMs: default-deny egress, hard timeout, verified teardown."""


@job.command("run")
def run() -> None:
    """Run a job spec in a microVM."""
    not_built("job run", "Tier-2 microVM jobs")


commands = [job]
