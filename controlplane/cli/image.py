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
@click.option(
    "--verify-reproducible",
    is_flag=True,
    help="Then rebuild from the recorded package set into a scratch store and compare bit for bit "
    "(exit 3 naming each differing file and its cause).",
)
@pass_app
def build(app: AppContext, recipe_path: Path | None, force: bool, verify_reproducible: bool) -> None:
    """Build the golden image: rootfs, ext4/qcow2, kernel+initrd, manifest, SBOM.

    \b
    Images are cached by recipe digest under <home>/cache/images/ ($AVM_IMAGE_CACHE overrides
    it); a cached image is returned at once. Needs root, mmdebstrap, e2fsprogs and qemu-utils.
    Progress goes to stderr; the image digest (sha256 of manifest.json) to stdout.
    """
    from controlplane.image.build import build_and_record
    from controlplane.image.recipe import DEFAULT_RECIPE, load_recipe

    source = recipe_path or DEFAULT_RECIPE
    recipe = load_recipe(source)  # refused here, before the home or the store is touched
    result, receipt_id = build_and_record(
        app.home,
        recipe,
        source=str(source),
        force=force,
        progress=lambda line: click.echo(line, err=True),
        verify_reproducible=verify_reproducible,
    )
    from controlplane.image import provenance

    path, prov_digest, prov_receipt = provenance.attest(app.home, result.image, receipt_id)
    doc = {
        **result.summary(),
        "receipt_id": receipt_id,
        "provenance": {"path": str(path), "digest": prov_digest, "receipt_id": prov_receipt},
    }

    def human() -> None:
        click.echo(result.image.digest)
        click.echo(f"  directory: {result.image.directory}", err=True)
        click.echo(f"  cached:    {str(result.cached).lower()}", err=True)
        if receipt_id:
            click.echo(f"  receipt:   {receipt_id}", err=True)
        click.echo(f"  provenance: {path} (SLSA v1, receipt {prov_receipt})", err=True)

    app.emit(doc, human)


@image.command("verify")
@click.option("--digest", default=None, help="The image digest (sha256:...) [default: the newest image].")
@click.option(
    "--key",
    "key_paths",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    multiple=True,
    help="Receipt public key(s) to trust [default: this home's own].",
)
@pass_app
def verify(app: AppContext, digest: str | None, key_paths: tuple[Path, ...]) -> None:
    """Check a golden image against its SLSA provenance (exit 3 if it does not match).

    \b
    The provenance (<home>/provenance/<digest>.intoto.json) must be signed by a trusted receipt
    key and recorded by an image-provenance receipt; the manifest digest and every artifact,
    re-hashed, must be what it names. Codes: provenance-missing, provenance-malformed,
    provenance-untrusted-key, provenance-signature-invalid, provenance-subject-mismatch,
    provenance-not-recorded, image-artifact-mismatch.
    """
    from controlplane.evidence import keys
    from controlplane.image import provenance
    from controlplane.image.golden import load_image

    home = app.home_as_is
    trusted = keys.load_trusted(list(key_paths)) if key_paths else keys.load_own_trusted(home)
    report = provenance.verify(home, load_image(home, digest), trusted)
    app.emit(
        {"ok": True, **report},
        f"ok: {report['image']} matches its provenance ({len(report['artifacts'])} artifacts)",
    )


# -- Tier-2 job images: a local OCI image layout store ----------------------------------------


@image.command("import")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option("--name", default=None, help="Store the image under this name (default: its ref name).")
@pass_app
def import_(app: AppContext, source: Path, name: str | None) -> None:
    """Import an OCI image layout directory or a tar of one into the job image store.

    Every blob is re-hashed. Prints NAME@sha256:... for each image: pin that in job specs.
    """
    from controlplane.jobs.oci.store import import_layout

    images = import_layout(app.home, source, name)
    app.emit({"images": [i.ref for i in images]}, "\n".join(i.ref for i in images))


@image.command("build-job")
@click.argument("name")
@click.option("--file", "files", multiple=True, metavar="SRC:DEST", help="Host file SRC at DEST.")
@click.option("--busybox/--no-busybox", default=True, show_default=True, help="Add busybox as /bin/sh.")
@pass_app
def build_job(app: AppContext, name: str, files: tuple[str, ...], busybox: bool) -> None:
    """Build a small one-layer job image from files (deterministic: same files, same digest)."""
    import shutil

    from controlplane.errors import OperationalError, UsageError
    from controlplane.jobs.oci.store import build_job_image

    mapping = {}
    for item in files:
        src, sep, dest = item.partition(":")
        if not sep or not src or not dest:
            raise UsageError("image-file-invalid", f"--file {item!r}: expected SRC:DEST")
        mapping[dest] = Path(src)
    bb = shutil.which("busybox") if busybox else None
    if busybox and bb is None:
        raise OperationalError(
            "tool-missing", "busybox is not installed", hint="apt-get install busybox-static"
        )
    stored = build_job_image(app.home, name, mapping, busybox=Path(bb) if bb else None)
    app.emit({"image": stored.ref}, stored.ref)


@image.command("sign")
@click.argument("ref")
@click.option("--key", "key_path", default=None, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--sigstore-bundle",
    "bundle_path",
    default=None,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Instead of --key: a Sigstore bundle over the image's simple-signing payload, verified "
    "offline (keyless or key pair) and stored.",
)
@pass_app
def sign(app: AppContext, ref: str, key_path: Path | None, bundle_path: Path | None) -> None:
    """Sign NAME@sha256:... with a cosign key ($COSIGN_PASSWORD) and store the signature.

    The signed bytes are cosign's simple-signing payload naming the manifest digest. With
    --sigstore-bundle, a bundle made elsewhere over those bytes is verified and stored instead.
    """
    from controlplane.errors import UsageError
    from controlplane.image.sign import import_sigstore_bundle, sign_image
    from controlplane.jobs.oci.store import resolve
    from controlplane.release.trust import password_from_env

    if (key_path is None) == (bundle_path is None):
        raise UsageError("sign-how", "pass exactly one of --key cosign.key or --sigstore-bundle FILE")
    stored = resolve(app.home, ref)
    if bundle_path is not None:
        path, who = import_sigstore_bundle(app.home, stored.name, stored.digest, bundle_path.read_bytes())
        app.emit(
            {"image": stored.ref, "signature": str(path), "signer": who}, f"verified {who}\nstored {path}"
        )
        return
    assert key_path is not None
    try:
        key = key_path.read_bytes()
    except OSError as exc:
        raise UsageError("key-unreadable", f"cannot read {key_path}: {exc.strerror}") from exc
    path = sign_image(app.home, stored.name, stored.digest, key, password_from_env())
    app.emit({"image": stored.ref, "signature": str(path)}, f"signed {stored.ref}")


commands = [image]
