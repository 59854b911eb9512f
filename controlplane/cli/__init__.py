"""``avm``: the command line. One error boundary; commands are thin (options -> call -> render).

Heavy imports (paramiko, pulumi, libvirt, cryptography) happen inside the commands that need
them, so ``avm --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from controlplane.cli import groups
from controlplane.cli.app import AppContext
from controlplane.errors import EXIT_CODE_HELP, AvmError, ExitCode
from controlplane.home import default_home

_STATE: dict[str, bool] = {"json": False, "debug": False}

_EXIT_TABLE = "\n".join(f"  {int(code):>3}  {text}" for code, text in EXIT_CODE_HELP.items())

EPILOG = f"""\b
Exit codes:
{_EXIT_TABLE}

\b
Everything stateful lives under --home (keys/, receipts/, inventory/, cache/, run/).
Mutating commands print their plan and change nothing unless --apply is given.
Every step writes a signed, hash-chained receipt: `avm receipts verify` checks them offline.
"""


class _AvmGroup(click.Group):
    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage("avm", "[--home DIR] [--json] [--debug] COMMAND [ARGS]...")


@click.group(cls=_AvmGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    "home",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="State directory [default: $AVM_HOME, else ~/.avm].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON document.")
@click.option("--debug", is_flag=True, help="Show tracebacks; re-raise errors instead of diagnosing them.")
@click.version_option(package_name="agent-vm", prog_name="avm")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, as_json: bool, debug: bool) -> None:
    """avm: promote AI agents onto a golden VM, run risky work in microVMs, and prove it.

    \b
    Release engineer:  avm sign, avm promote --commit SHA [--apply], avm rollback [--apply]
    SRE / on-call:     avm status (exit 2 on drift), avm vm up|down|status|ssh
    Platform engineer: avm image build, avm job run SPEC
    Auditor:           avm receipts list|show|verify|export
    """
    _STATE["json"] = as_json
    _STATE["debug"] = debug
    ctx.obj = AppContext(home_path=home or default_home(), json=as_json, debug=debug)


groups.register(cli)


def _print_error(err: AvmError) -> None:
    if _STATE["json"]:
        click.echo(json.dumps({"error": err.to_dict()}, indent=2, sort_keys=True, default=str))
        return
    click.secho(f"error[{err.code}]: {err.message}", fg="red", err=True)
    expected = err.details.get("expected")
    actual = err.details.get("actual")
    if expected is not None or actual is not None:
        click.echo(f"  expected: {expected}", err=True)
        click.echo(f"  actual:   {actual}", err=True)
    if err.hint:
        click.echo(f"  hint: {err.hint}", err=True)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point: the one error boundary. Exits with a code from ``ExitCode``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv: Any = cli.main(args=args, prog_name="avm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
    except click.ClickException as exc:
        # Click's usage errors would exit 2, which means "drift" here.
        if _STATE["json"] or "--json" in args:
            doc = {"code": "usage", "message": exc.format_message(), "exit_code": int(ExitCode.USAGE)}
            click.echo(json.dumps({"error": doc}, indent=2, sort_keys=True))
        else:
            exc.show()
        sys.exit(int(ExitCode.USAGE))
    except AvmError as exc:
        if _STATE["debug"]:
            raise
        _print_error(exc)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception:
        if _STATE["debug"]:
            raise
        click.secho("internal error (a bug in avm); traceback follows:", fg="red", err=True)
        traceback.print_exc()
        sys.exit(int(ExitCode.ERROR))
    sys.exit(int(rv) if isinstance(rv, int) else 0)
