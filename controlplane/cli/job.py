"""avm job: Tier-2 microVM jobs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from controlplane.cli.app import AppContext, pass_app
from controlplane.jobs.runtime.qemu import MACHINES

SPEC = click.Path(path_type=Path, dir_okay=False)


@click.group("job")
def job() -> None:
    """Run Tier-2 jobs in ephemeral microVMs: default-deny egress, hard timeout, verified teardown."""


@job.command("run")
@click.argument("spec_path", metavar="SPEC", type=SPEC)
@click.option("--target", default="local", show_default=True, help="local, or an inventory VM name.")
@click.option("--runtime", type=click.Choice(["qemu", "kata"]), default="qemu", show_default=True)
@click.option("--machine", type=click.Choice(MACHINES), default="microvm", show_default=True)
@click.option(
    "--guest-kernel",
    type=click.Choice(["golden", "minimal"]),
    default="golden",
    show_default=True,
    help="golden: the golden image's kernel; minimal: the cached tinyconfig kernel (3x faster boot).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="A new or empty directory for the outputs (refused if not empty). Default: a new "
    "<home>/jobs-out/<id>+<run> per run.",
)
@pass_app
def run(
    app: AppContext,
    spec_path: Path,
    target: str,
    runtime: str,
    machine: str,
    guest_kernel: str,
    out_dir: Path | None,
) -> int:
    """Run a job spec in a microVM. Exit 0 ok, 4 the job exited non-zero, 124 timeout.

    \b
    The job's own exit code is in the output (exit_code) and the receipt, never passed through.
    Refused with exit 3, before anything boots: an image digest that is not the pin, a missing,
    untrusted or wrong signature, an input outside the spec's directory. Exit 64: an invalid spec
    (unpinned image, bad id, ../ paths, NUL bytes), a non-empty --out. The guest console streams
    live to stderr; stdout gets the job's stdout.
    """
    from controlplane.jobs.runner import run_job
    from controlplane.jobs.spec import load_jobspec

    spec = load_jobspec(spec_path)
    with contextlib.ExitStack() as connection:  # the host connection is closed on every path
        transport = None
        if target != "local":
            from controlplane.transport import connect, inventory

            transport = connection.enter_context(connect(inventory.load(app.home, target)))
        result = run_job(
            app.home,
            spec,
            spec_dir=spec_path.resolve().parent,
            output_dir=out_dir,
            runtime=runtime,
            machine=machine,
            kernel=guest_kernel,
            transport=transport,
            stream=None if app.json else (lambda line: click.echo(f"[{spec.id}] {line}", err=True)),
        )
    doc = {
        "job_id": result.job_id,
        "status": result.status,
        "exit_code": result.exit_code,
        "avm_exit_code": result.avm_exit_code,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "outputs": result.outputs,
        "output_dir": str(result.output_dir) if result.output_dir else None,
        "console_log": str(result.console_log) if result.console_log else None,
        "truncated": bool(result.truncated),
        "truncation": result.truncated,
        "wall_s": round(result.wall_s, 3),
        "receipt_id": result.receipt_id,
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in result.checks],
    }

    def human() -> None:
        click.echo(result.stdout, nl=False)
        code = "none (killed at the timeout)" if result.exit_code is None else result.exit_code
        click.echo(f"job {result.job_id}: {result.status}, job exit {code}, {result.wall_s:.2f}s", err=True)
        for cut in result.truncated:
            seen, limit = cut["bytes_seen"], cut["limit"]
            click.echo(f"  TRUNCATED {cut['name']}: {seen} bytes seen, limit {limit}", err=True)
        for name, ok, detail in result.checks:
            click.echo(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", err=True)
        click.echo(f"  receipt: {result.receipt_id}", err=True)

    app.emit(doc, human)
    return result.avm_exit_code


@job.command("probe-egress")
@click.argument("spec_path", metavar="SPEC", type=SPEC)
@click.option("--guest-kernel", type=click.Choice(["golden", "minimal"]), default="golden", show_default=True)
@pass_app
def probe_egress(app: AppContext, spec_path: Path, guest_kernel: str) -> int:
    """From inside a real guest of SPEC's image, try every egress class; record what happened.

    Exit 0 when every deny class was denied and every allowed destination reached, else 1.
    """
    from controlplane.jobs.probe import probe_egress as probe
    from controlplane.jobs.spec import load_jobspec

    spec = load_jobspec(spec_path)
    report = probe(app.home, spec, spec_dir=spec_path.resolve().parent, kernel=guest_kernel)

    def human() -> None:
        for row in report.rows:
            mark = "ok  " if row.as_expected else "FAIL"
            click.echo(
                f"{mark} {row.klass:<22} {row.target:<28} expected {row.expected:<7} observed {row.observed}"
            )
        click.echo(f"receipt: {report.receipt_id}", err=True)

    app.emit(report.as_dict(), human)
    return 0 if report.ok else 1


@job.command("gc")
@pass_app
def gc(app: AppContext) -> None:
    """Remove leftovers (QEMU processes, job networks, work dirs) of runners that are gone."""
    from controlplane.jobs.teardown import gc as collect

    removed = collect(app.home)
    app.emit({"removed": removed}, "\n".join(removed) or "nothing left")


commands = [job]
