"""avm secrets: the local secret store that `secret://local/NAME` references resolve from."""

from __future__ import annotations

import sys

import click

from controlplane.cli.app import AppContext, pass_app


@click.group("secrets")
def secrets() -> None:
    """Store secret values for `secret://local/NAME` references (files 0600 under the home).

    \b
    Values are read from stdin, never from arguments (which land in shell history and
    process lists), and are never printed, logged or written to receipts.
    """


@secrets.command("put")
@click.argument("ref")
@pass_app
def put(app: AppContext, ref: str) -> None:
    """Store the value for REF (secret://local/NAME), read from stdin.

    Example: printf %s "$TOKEN" | avm secrets put secret://local/web-api-token
    """
    from controlplane.errors import UsageError
    from controlplane.governance import secrets as store

    value = sys.stdin.buffer.read()
    if not value:
        raise UsageError(
            "secret-empty", "no value on stdin", hint="pipe the value in: printf %s VALUE | avm ..."
        )
    path = store.put(app.home, ref, value)
    app.emit(
        {"ref": ref, "path": str(path), "bytes": len(value)}, f"stored {ref} ({len(value)} bytes) in {path}"
    )


commands = [secrets]
