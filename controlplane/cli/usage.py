"""avm usage: what each profile sent and received through a Tier-1 host's egress gateway."""

from __future__ import annotations

import click

from controlplane.cli.app import AppContext, pass_app


@click.command("usage")
@click.option("--target", required=True, help="Inventory name of the host or VM.")
@click.option("--since", default="", help="An ISO 8601 time (UTC if naive) or a duration: 90s, 30m, 2h, 7d.")
@pass_app
def usage(app: AppContext, target: str, since: str) -> None:
    """Requests, denials, body bytes and tokens per profile and destination (the gateway's log).

    \b
    Counted by the gateway, outside the agent: requests and denials (by reason, budgets
    included), request and response body bytes, and the token counts the upstream's JSON
    usage object reported (OpenAI prompt/completion, Anthropic input/output). Read-only.
    With --json: {target, since, log_bytes, truncated, rows, totals}.
    """
    from controlplane.boundary import usage as counts
    from controlplane.promote import usage as tier1usage
    from controlplane.transport import connect, inventory

    stamp = counts.since_stamp(since) if since else ""  # refused (exit 64) before connecting
    entry = inventory.load(app.home, target)
    with connect(entry) as host:
        doc = {"target": target, **tier1usage.read(host, stamp)}

    def human() -> None:
        if not doc["rows"]:
            click.echo(f"no gateway requests on {target}" + (f" since {stamp}" if stamp else ""))
            return
        click.echo(counts.table(doc["rows"]))
        t = doc["totals"]
        click.echo(
            f"total: {t['requests']} requests, {t['denied']} denied, {t['bytes_sent']} bytes sent, "
            f"{t['bytes_received']} received, {t['input_tokens']} input / {t['output_tokens']} output tokens"
        )
        if doc["truncated"]:
            click.echo(
                "note: only the newest part of the gateway's log was read; older requests are not counted"
            )

    app.emit(doc, human)


commands = [usage]
