"""``avm``: the command line. One error boundary; commands are thin (options -> call -> render).

Heavy imports (paramiko, pulumi, libvirt, cryptography) happen inside the commands that need
them, so ``avm --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Sequence
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
@click.option(
    "--debug",
    is_flag=True,
    help="Add a traceback to error output (stderr); exit code and stdout stay the same.",
)
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


def _set_flag(name: str) -> Callable[[click.Context, click.Parameter, bool], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if not value:
            return
        _STATE[name] = True
        app = ctx.find_object(AppContext)
        if app is not None:
            setattr(app, name, True)

    return callback


def _accept_output_flags(command: click.Command) -> None:
    """``--json`` and ``--debug`` mean the same after any command as before it
    (``avm status --target VM --json`` == ``avm --json status --target VM``): added here, once,
    to every command and group, rather than declared by each."""
    for name, text in (("json", "Same as `avm --json`."), ("debug", "Same as `avm --debug`.")):
        if not any(f"--{name}" in param.opts for param in command.params):
            command.params.append(
                click.Option(
                    [f"--{name}"],
                    is_flag=True,
                    expose_value=False,
                    callback=_set_flag(name),
                    help=text,
                )
            )
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _accept_output_flags(sub)


for _command in cli.commands.values():
    _accept_output_flags(_command)


def _print_error(err: AvmError) -> None:
    if _STATE["json"]:
        _print_json_error(err.to_dict())
        return
    click.secho(f"error[{err.code}]: {err.message}", fg="red", err=True)
    expected = err.details.get("expected")
    actual = err.details.get("actual")
    if expected is not None or actual is not None:
        click.echo(f"  expected: {expected}", err=True)
        click.echo(f"  actual:   {actual}", err=True)
    candidates = err.details.get("candidates")
    if isinstance(candidates, list) and candidates:
        click.echo("  candidates:", err=True)
        for candidate in candidates:
            click.echo(f"    {candidate}", err=True)
    if err.hint:
        click.echo(f"  hint: {err.hint}", err=True)
    if err.receipt is not None:
        click.echo(f"  evidence: receipt #{err.receipt} (`avm receipts show {err.receipt}`)", err=True)


def _print_json_error(doc: dict[str, Any]) -> None:
    click.echo(json.dumps({"error": doc}, indent=2, sort_keys=True, default=str))


def _traceback_if_debug() -> None:
    """``--debug`` adds the traceback on stderr; the exit code and stdout stay what they are."""
    if _STATE["debug"]:
        traceback.print_exc()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point: the one error boundary. Exits with a code from ``ExitCode``."""
    args = list(sys.argv[1:] if argv is None else argv)
    _STATE.update(json=False, debug=False)
    try:
        rv: Any = cli.main(args=args, prog_name="avm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
    except click.ClickException as exc:
        # Click's usage errors would exit 2, which means "drift" here.
        _traceback_if_debug()
        if _STATE["json"] or "--json" in args:
            _print_json_error(
                {"code": "usage", "message": exc.format_message(), "exit_code": int(ExitCode.USAGE)}
            )
        else:
            exc.show()
        sys.exit(int(ExitCode.USAGE))
    except AvmError as exc:
        _traceback_if_debug()
        _print_error(exc)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as exc:
        click.secho("internal error (a bug in avm); traceback follows:", fg="red", err=True)
        traceback.print_exc()
        if _STATE["json"]:
            _print_json_error({"code": "internal", "message": repr(exc), "exit_code": int(ExitCode.ERROR)})
        sys.exit(int(ExitCode.ERROR))
    sys.exit(int(rv) if isinstance(rv, int) else 0)
