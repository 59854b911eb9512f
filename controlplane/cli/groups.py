"""The command groups of ``avm``, one module each under ``controlplane.cli``.

Each module exposes ``commands``: the click commands or groups it adds to the top level.
Modules must import only click and light package modules at import time.
"""

from __future__ import annotations

import importlib

import click

MODULES = (
    "keys",
    "receipts",
    "image",
    "vm",
    "release",  # sign
    "promote",  # promote, status, rollback
    "job",
    "approve",
    "tiers",  # tiers show
    "secrets",  # secrets put
    "egress",  # egress apply
    "usage",  # usage
)


def register(root: click.Group) -> None:
    for name in MODULES:
        module = importlib.import_module(f"controlplane.cli.{name}")
        for command in module.commands:
            root.add_command(command)
