"""avm image: build the golden image from code."""

from __future__ import annotations

from pathlib import Path

import click

from controlplane.cli.app import AppContext, pass_app


@click.group("image")
def image() -> None:
    """Build the golden VM image from images/golden.yaml (cached by recipe digest)."""


@image.command("build")
@click.option(
    "--recipe",
    "recipe_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Image recipe (YAML or JSON) [default: images/golden.yaml].",
)
@click.option("--force", is_flag=True, help="Rebuild even when an image of this recipe is cached.")
@pass_app
def build(app: AppContext, recipe_path: Path | None, force: bool) -> None:
    """Build the golden image: rootfs, ext4/qcow2, kernel+initrd, manifest, SBOM.

    \b
    Images are cached by recipe digest under <home>/cache/images/ ($AVM_IMAGE_CACHE overrides
    it); a cached image is returned at once. Needs root, mmdebstrap, e2fsprogs and qemu-utils.
    Progress goes to stderr; the image digest (sha256 of manifest.json) to stdout.
    """
    from controlplane.imagebuild import build_and_record
    from controlplane.recipe import DEFAULT_RECIPE, load_recipe

    source = recipe_path or DEFAULT_RECIPE
    recipe = load_recipe(source)  # refused here, before the home or the store is touched
    result, receipt_id = build_and_record(
        app.home, recipe, source=str(source), force=force, progress=lambda line: click.echo(line, err=True)
    )
    doc = {**result.summary(), "receipt_id": receipt_id}

    def human() -> None:
        click.echo(result.image.digest)
        click.echo(f"  directory: {result.image.directory}", err=True)
        click.echo(f"  cached:    {str(result.cached).lower()}", err=True)
        if receipt_id:
            click.echo(f"  receipt:   {receipt_id}", err=True)

    app.emit(doc, human)


commands = [image]
