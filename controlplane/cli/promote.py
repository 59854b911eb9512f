"""avm promote / status / rollback: Tier-1 promotion by exact commit, drift, and rollback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from controlplane.cli.app import AppContext, pass_app

if TYPE_CHECKING:
    from controlplane.promote.drift import DriftReport
    from controlplane.promote.pipeline import Result

REPO = click.option(
    "--repo",
    required=True,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="The agent's git repository.",
)
TARGET = click.option(
    "--target", required=True, help="Inventory name of the host or VM (see `avm vm status`)."
)
PROFILE = click.option(
    "--profile", "profiles", multiple=True, help="Only this profile; repeatable [default: all]."
)
APPLY = click.option("--apply", is_flag=True, help="Execute the plan. Without it, nothing is changed.")


def _render_plan(app: AppContext, result: Result) -> None:
    click.echo(f"{result.operation} {result.commit} -> {result.target}")
    if result.plan.empty:
        click.echo("in sync: nothing to do")
    for action in result.plan.actions:
        detail = f"  ({action.actual or '-'} -> {action.expected})" if action.expected else ""
        click.echo(f"  {action.kind:<15} {action.target[:40]:<40} {action.reason}{detail}")
    click.echo(f"plan digest: {result.plan.digest}")
    if not result.applied and not result.plan.empty:
        click.echo("dry-run: nothing was changed; add --apply to execute exactly this plan")
    if result.applied:
        click.echo(f"applied; healthy: {', '.join(result.healthy) or '-'}")
    click.echo("receipts: " + ", ".join(f"{k} #{v}" for k, v in result.receipts.items()))


def _emit(app: AppContext, result: Result) -> None:
    app.emit(result.to_dict(), lambda: _render_plan(app, result))


@click.command("promote")
@REPO
@click.option("--commit", "ref", required=True, help="Commit to promote (a ref is resolved to the full SHA).")
@TARGET
@PROFILE
@APPLY
@pass_app
def promote(
    app: AppContext, repo: Path, ref: str, target: str, profiles: tuple[str, ...], apply: bool
) -> None:
    """Promote an exact commit to a target: dry-run plan by default, --apply to execute it.

    \b
    Stages: resolve the ref -> verify the signature and pinned digests (exit 3 on failure,
    host untouched) -> gather host facts in one round trip -> print the plan and its digest.
    With --apply: lock the host, re-check the plan digest, record the rollback target, then
    create the write-once release, write env/policy/drop-in/credentials, flip `current`,
    restart changed profiles (canaries first, then a soak) and health-check each; an
    unhealthy profile is rolled back automatically (exit 1).
    """
    from controlplane.promote import pipeline as promotion

    result = promotion.run(
        app.home, repo=repo, ref=ref, target=target, profiles=profiles, apply=apply, progress=app.say
    )
    _emit(app, result)


@click.command("rollback")
@REPO
@TARGET
@PROFILE
@click.option(
    "--to",
    "to",
    default=None,
    help="Release to go back to [default: the one recorded before the last promotion].",
)
@APPLY
@pass_app
def rollback(
    app: AppContext, repo: Path, target: str, profiles: tuple[str, ...], to: str | None, apply: bool
) -> None:
    """Roll back to the release recorded before the last promotion (dry-run by default).

    The target release is verified again (signature, pinned digests, release intact on the
    host) and promoted exactly like a new one, with its own receipts.
    """
    from controlplane.promote import pipeline as promotion
    from controlplane.promote import state as promotestate

    ref, chosen = promotestate.rollback_ref(app.home, target, profiles, to)
    app.say(f"rollback target: {ref}")
    result = promotion.run(
        app.home,
        repo=repo,
        ref=ref,
        target=target,
        profiles=chosen,
        apply=apply,
        operation="rollback",
        progress=app.say,
    )
    _emit(app, result)


@click.command("status")
@TARGET
@pass_app
def status(app: AppContext, target: str) -> int:
    """Re-derive the live state of a target and report drift (exit 0 in sync, 2 drift, 1 error).

    \b
    Compares the host, read in one round trip, with what the last apply receipt says it left:
    which release each `current` points at, every release file's hash, the unit template and
    drop-ins, env and policy files, whether each unit is active, unexpected profiles.
    Then it probes each profile's sandbox: an unlisted destination must be refused to the
    unit's user (else drift), and the kernel's cgroup limits are shown (not-enforced where the
    backend does not apply them). It never writes to the host.
    """
    from controlplane.promote import status as status_mod

    report = status_mod.check(app.home_as_is, target)
    app.emit(_report_doc(report), lambda: _render_report(report))
    return 0 if report.in_sync else 2


def _report_doc(report: DriftReport) -> dict[str, Any]:
    return {**report.model_dump(mode="json"), "in_sync": report.in_sync}


def _render_controls(report: DriftReport) -> None:
    for name, seen in sorted(report.controls.items()):
        click.echo(
            f"  {name}: egress {seen.get('egress')}, limits {seen.get('limits')} (observed in the sandbox)"
        )
        for kind, reading in sorted(seen.get("limit_readings", {}).items()):
            if reading.get("status") == "not-enforced":
                click.echo(
                    f"    {kind} not-enforced: configured {reading.get('configured')}, "
                    f"kernel {reading.get('file')} = {reading.get('kernel')}"
                )


def _render_report(report: DriftReport) -> None:
    against = f"{report.baseline} receipt #{report.receipt}"
    for note in report.notes:
        click.echo(f"note: {note}")
    if report.in_sync:
        click.echo(f"{report.target}: in sync with {against} ({', '.join(report.profiles)})")
        _render_controls(report)
        return
    count = len(report.findings)
    click.echo(f"{report.target}: DRIFT against {against} ({count} finding{'s' if count != 1 else ''})")
    # each finding's path on its own line, never cut: it is what the on-call engineer opens next
    for f in report.findings:
        click.echo(f"  {f.where}")
        click.echo(f"      {f.what}")
        click.echo(f"      expected: {f.expected or '-'}")
        click.echo(f"      actual:   {f.actual or '-'}")
    _render_controls(report)


commands = [promote, status, rollback]
