"""What every command gets: the home, the output mode, and one way to print results."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from controlplane.home import Home


@dataclasses.dataclass
class AppContext:
    home_path: Path
    json: bool
    debug: bool

    @property
    def home(self) -> Home:
        """The home, its layout created if missing: for commands that write state."""
        return Home(self.home_path).ensure()

    @property
    def home_as_is(self) -> Home:
        """The home as it is, nothing created: read-only commands (``status``, ``receipts
        list|show|verify``) must not make a home tree as a side effect."""
        return Home(self.home_path)

    def say(self, message: str) -> None:
        """Progress and explanations go to stderr, so stdout stays one document."""
        if not self.json:
            click.echo(message, err=True)

    def emit(self, doc: dict[str, Any], human: Callable[[], None] | str) -> None:
        """Print the result: one JSON document with --json, else the human rendering."""
        if self.json:
            click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
        elif isinstance(human, str):
            click.echo(human)
        else:
            human()


pass_app = click.make_pass_decorator(AppContext)


def console() -> Any:
    """A rich console on stdout (imported lazily: rich costs ~25 ms)."""
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, soft_wrap=True)
