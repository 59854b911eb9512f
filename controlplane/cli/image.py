"""avm image: build the golden image from code."""

from __future__ import annotations

import click

from controlplane.cli.pending import not_built


@click.group("image")
def image() -> None:
    """Build the golden VM image from images/golden.yaml (cached by recipe digest)."""


@image.command("build")
def build() -> None:
    """Build the golden image: rootfs, ext4/qcow2, kernel+initrd, manifest, SBOM."""
    not_built("image build", "the golden VM")


commands = [image]
