"""avm egress apply: a host's egress gateway policy from a signed commit, hot-reloaded."""

from __future__ import annotations

import sys
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


@egress.command("log")
@click.option("--target", required=True, help="Inventory name of the host or VM.")
@click.option("--follow", is_flag=True, help="Keep printing new events (every second) until interrupted.")
@pass_app
def log(app: AppContext, target: str, follow: bool) -> None:
    """The gateway's egress.allowed / egress.denied events on a Tier-1 host (its access log).

    \b
    One line per request: time, event, profile, method host path, code, reason, policy
    generation (the last 200 without --follow). With --json: one document {target, events};
    with --json --follow, one JSON document per event, one per line.
    """
    import json
    import time

    from controlplane.promote import gatewaycheck
    from controlplane.transport import connect, inventory

    with connect(inventory.load(app.home, target)) as host:
        offset: int | None = None
        while True:
            seen, offset = gatewaycheck.read_log(host, offset)
            if not follow:
                text = "\n".join(_line(e) for e in seen) or "no egress events"
                app.emit({"target": target, "events": seen}, text)
                return
            for e in seen:
                click.echo(json.dumps(e, sort_keys=True) if app.json else _line(e))
            sys.stdout.flush()
            time.sleep(1.0)


@egress.command("options")
@click.option("--target", required=True, help="Inventory name of the host or VM.")
@click.option(
    "--upstream-ca",
    type=click.Path(path_type=Path, dir_okay=False),
    help="PEM CA bundle the gateway verifies upstreams against instead of the system store (copied).",
)
@click.option("--no-upstream-ca", is_flag=True, help="Verify upstreams against the system store again.")
@click.option(
    "--pin",
    "pins",
    multiple=True,
    metavar="HOST:PORT=ADDR:PORT",
    help="Connect to ADDR:PORT for the listed name HOST:PORT instead of resolving it (repeatable).",
)
@click.option("--unpin", "unpins", multiple=True, metavar="HOST:PORT", help="Remove a pin (repeatable).")
@click.option("--clear", is_flag=True, help="Start from no options (then apply the other flags).")
@pass_app
def options(
    app: AppContext,
    target: str,
    upstream_ca: Path | None,
    no_upstream_ca: bool,
    pins: tuple[str, ...],
    unpins: tuple[str, ...],
    clear: bool,
) -> None:
    """Show or change the gateway options of a Tier-1 target: a private upstream CA, pinned addresses.

    \b
    Without flags: print the options. Every change is validated before the file is written
    (exit 64, nothing changed). They are kept in the avm home and take effect at the next
    `avm promote --apply` or `avm egress apply --apply`.
    \b
    Example: avm egress options --target vm1 --upstream-ca ca.pem --pin api.example.com:443=10.0.0.7:8443
    """
    from controlplane.errors import UsageError
    from controlplane.promote import gwoptions
    from controlplane.transport import inventory

    inventory.load(app.home, target)  # an unknown target is refused before anything is written
    if upstream_ca is not None and no_upstream_ca:
        raise UsageError(
            "gateway-options-invalid",
            "--upstream-ca and --no-upstream-ca exclude each other",
            hint="give one of them",
        )
    changing = bool(upstream_ca or no_upstream_ca or pins or unpins or clear)
    if changing:
        doc = gwoptions.update(
            app.home,
            target,
            upstream_ca=upstream_ca,
            no_upstream_ca=no_upstream_ca,
            pins=pins,
            unpins=unpins,
            clear=clear,
        )
    else:
        doc = gwoptions.current(app.home, target)
    out = {"target": target, "changed": changing, **doc}

    def human(d: dict[str, Any] = out) -> None:
        click.echo(f"upstream CA: {d['upstream_ca'] or 'the system trust store'}")
        for dest, (addr, port) in d["upstreams"].items():
            click.echo(f"pin: {dest} -> {addr}:{port}")
        if not d["upstreams"]:
            click.echo("pins: none (names are resolved by the gateway)")
        if d["changed"]:
            click.echo("takes effect at the next `avm promote --apply` or `avm egress apply --apply`")

    app.emit(out, human)


def _line(e: dict[str, Any]) -> str:
    what = f"{e['method']} {e['host']}{e['path']}"
    return f"{e['t']} {e['event']:<14} {e['profile']} {what} {e['code']} {e['reason']} {e['policy'][:19]}"


commands = [egress]
