"""avm vm: golden VM lifecycle on qemu, nspawn, libvirt and gcp."""

from __future__ import annotations

import click

from controlplane.cli.pending import not_built


@click.group("vm")
def vm() -> None:
    """Boot, inspect, reach and tear down golden VMs (qemu, nspawn, libvirt, gcp)."""


@vm.command("up")
def up() -> None:
    """Boot a golden VM and pin its SSH host key in the inventory."""
    not_built("vm up", "the golden VM")


commands = [vm]
