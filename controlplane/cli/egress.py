"""avm egress apply: a host's egress gateway policy from a signed commit, hot-reloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from controlplane.cli.app import AppContext, pass_app


@click.group("egress")
def egress() -> None:
    """The egress gateway of a Tier-1 host (docs/egress.md, "Tier-1")."""


@egress.command("apply")
@click.option(
    "--repo",
    required=True,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="The agent's git repository.",
)
@click.option("--commit", "ref", required=True, help="Commit whose avm.yaml holds the policy (verified).")
@click.option("--target", required=True, help="Inventory name of the host or VM.")
@click.option("--apply", is_flag=True, help="Hot-reload the gateway. Without it, nothing is changed.")
@pass_app
def apply(app: AppContext, repo: Path, ref: str, target: str, apply: bool) -> None:
    """Change the gateway's policy to a signed commit's egress entries, without restarting agents.

    \b
    Dry-run by default: verify the commit (exit 3 on a failed gate), render the gateway, print
    the plan digest. With --apply: staged CDS -> LDS -> CDS, each proven in force on Envoy's
    admin socket; a rejected update restores the last good generation (exit 1, the receipt
    says so). Agent MainPIDs are checked unchanged; then the sandbox probes, as after a promote.
    """
    from controlplane.promote import egressapply

    out = egressapply.run(app.home, repo=repo, ref=ref, target=target, apply=apply, progress=app.say)

    def human(doc: dict[str, Any] = out) -> None:
        click.echo(f"egress {doc['commit']} -> {doc['target']}: {doc['from']} -> {doc['to']}")
        click.echo(f"plan digest: {doc['plan_digest']}")
        if doc["applied"]:
            click.echo(f"in force in {doc['reload_s']} s; agents not restarted")
        elif doc["from"] == doc["to"]:
            click.echo("in sync: nothing to do")
        else:
            click.echo("dry-run: nothing was changed; add --apply to hot-reload exactly this")
        click.echo("receipts: " + ", ".join(f"{k} #{v}" for k, v in doc["receipts"].items()))

    app.emit(out, human)


commands = [egress]
