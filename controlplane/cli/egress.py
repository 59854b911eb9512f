"""avm egress apply / log / requests / deny: a host's egress gateway policy from a signed
commit or from approved permission requests, hot-reloaded; its events; agents' requests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from controlplane.cli.app import AppContext, pass_app
from controlplane.errors import UsageError


@click.group("egress")
def egress() -> None:
    """The egress gateway of a Tier-1 host (docs/egress.md, "Tier-1")."""


@egress.command("apply")
@click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="The agent's git repository (with --commit). Without both: the approved requests.",
)
@click.option("--commit", "ref", help="Commit whose avm.yaml holds the policy (verified).")
@click.option("--target", required=True, help="Inventory name of the host or VM.")
@click.option("--apply", is_flag=True, help="Hot-reload the gateway. Without it, nothing is changed.")
@pass_app
def apply(app: AppContext, repo: Path | None, ref: str | None, target: str, apply: bool) -> None:
    """Change the gateway's policy, without restarting agents: to a signed commit's egress
    entries (--repo, --commit), or the policy in force plus the approved permission requests.

    \b
    Dry-run by default: verify the commit (exit 3 on a failed gate) or count each request's
    approvals (exit 3 when short), render the gateway, print the plan digest. With --apply:
    staged CDS -> LDS -> CDS, each proven in force on Envoy's admin socket; a rejected update
    restores the last good generation (exit 1, the receipt says so). Agent MainPIDs are checked
    unchanged; then the sandbox probes, as after a promote, and one per granted request.
    """
    from controlplane.promote import egressapply, egressrequests

    if (repo is None) != (ref is None):
        raise UsageError(
            "egress-apply-how", "--repo and --commit go together (or neither: apply the approved requests)"
        )
    if repo is None or ref is None:
        done = egressrequests.apply(app.home, target, apply=apply, progress=app.say)
        app.emit(done, lambda: _human_requests(done))
        return
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
    """The gateway's egress.allowed / egress.denied / classifier.denied events on a Tier-1 host.

    \b
    One line per request (the gateway's access log): time, event, profile, method host path,
    code, reason, policy generation, and for classifier.denied the verdict's level and finding
    kinds (the last 200 without --follow). With --json: one document {target, events};
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


def _human_requests(doc: dict[str, Any]) -> None:
    click.echo(f"egress requests {', '.join(doc['requests'])} -> {doc['target']}: to {doc['to']}")
    click.echo(f"plan digest: {doc['plan_digest']}")
    if doc["applied"]:
        click.echo(f"in force in {doc['reload_s']} s; agents not restarted")
    else:
        click.echo("dry-run: nothing was changed; add --apply to hot-reload exactly this")
    click.echo("receipts: " + ", ".join(f"{k} #{v}" for k, v in doc["receipts"].items()))


@egress.command("requests")
@click.option("--target", required=True, help="Inventory name of the host or VM.")
@click.option("--all", "every", is_flag=True, help="Also those denied, applied, expired or invalid.")
@pass_app
def requests_(app: AppContext, target: str, every: bool) -> None:
    """The agents' permission requests (POST http://avm.boundary/requests), collected from the host.

    \b
    Each stored request is judged (an invalid one is listed with why, never trusted) and
    recorded in an egress-requests receipt with the change it asks for: the profile's policy
    generation before and after, and the digest `avm approve --request ID` signs. States:
    pending, approved, denied, applied, expired, invalid. Lists pending, approved and invalid
    ones unless --all; with --json, every request.
    """
    from controlplane.promote import egressrequests

    out = egressrequests.collect(app.home, target)
    shown = [e for e in out["requests"] if every or e["state"] in ("pending", "approved", "invalid")]
    lines = []
    for e in shown:
        what = e.get("rule") or {}
        ask = f"{','.join(what.get('methods', []))} {what.get('host', '?')}:{what.get('port', '?')}"
        ask += f" {','.join(what.get('paths', []))}" if what else ""
        lines.append(
            f"{e['id']}  {e['state']:<8} {e.get('profile') or '?':<12} {ask if what else e.get('error')}"
        )
        if what:
            lines.append(f"    reason: {e.get('reason')!r}; change {e['from'][:19]} -> {e['to'][:19]}")
    text = "\n".join(lines) or f"no permission requests on {target}"
    app.emit(out, text + f"\nreceipt #{out['receipt']} (egress-requests)")


@egress.command("deny")
@click.option("--request", "request_id", required=True, help="The request id (rq-...).")
@click.option("--reason", default="denied by a reviewer", show_default=True, help="Recorded with the denial.")
@pass_app
def deny(app: AppContext, request_id: str, reason: str) -> None:
    """Deny a collected permission request: recorded (egress-request-denied), never applied."""
    from controlplane.promote import egressrequests

    out = egressrequests.deny(app.home, request_id, reason)
    app.emit(
        out, f"denied {request_id} on {out['target']}\nreceipt #{out['receipt']} (egress-request-denied)"
    )


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
    line = f"{e['t']} {e['event']:<14} {e['profile']} {what} {e['code']} {e['reason']} {e['policy'][:19]}"
    if e.get("event") == "classifier.denied":  # the verdict: level and finding kinds, never text
        line += f" {e.get('sensitivity')} [{','.join(e.get('findings') or [])}]"
    return line


commands = [egress]
