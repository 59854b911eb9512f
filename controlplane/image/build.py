"""``avm image build``: the golden image, from recipe to manifest, cached by recipe digest.

Stages (each timed and reported)::

    mmdebstrap   packages into rootfs/, then the customize hook (controlplane.image.hook)
    inspect      no SSH host key left; exactly one kernel; vmlinuz + initrd.img copied out
    sbom         dpkg-query of the rootfs -> SPDX 2.3
    tree         rootfs.tree: every file of rootfs with its sha256
    mkfs         mkfs.ext4 -d rootfs -> golden.raw
    qcow2        qemu-img convert -> golden.qcow2
    manifest     sha256 of every artifact -> canonical manifest.json (its sha256 is the image digest)
    publish      atomic rename of the build directory into <store>/<recipe-hex>/

The build runs in a temporary directory inside the store, under an exclusive lock per recipe,
and is renamed into place only when complete, so a crash or timeout never leaves a half image
where ``load_image`` would find it. A second build of the same recipe finds the finished image
and returns at once (``cached``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import controlplane
from controlplane._internal import tools as imagetools
from controlplane._internal.progress import Progress, quiet
from controlplane.canonical import canonical_bytes
from controlplane.errors import CommandFailed, OperationalError, RefusedError
from controlplane.home import Home
from controlplane.image import sbom
from controlplane.image import store as imagestore
from controlplane.image.golden import (
    ARTIFACT_FILES,
    MANIFEST,
    ROOTFS,
    Artifact,
    GoldenImage,
    ImageManifest,
    RootfsInfo,
    file_sha256,
    image_store,
    rootfs_tree,
)
from controlplane.image.hook import RECIPE_ENV, REPORT_ENV
from controlplane.image.recipe import Recipe
from controlplane.transport.base import RunResult

REQUIRED_TOOLS = ("unshare", "mmdebstrap", "chroot", "dpkg-query", "mkfs.ext4", "qemu-img")
_HOOK_SHIM = """#!{python}
# avm image build: mmdebstrap runs this file directly (no shell) as its --customize-hook
import sys

from controlplane.image.hook import main

raise SystemExit(main(sys.argv[1:]))
"""


@dataclasses.dataclass
class _Built:
    """What the stages of one fresh build observed."""

    stages_s: dict[str, float] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    commands: list[RunResult] = dataclasses.field(default_factory=list)
    customize: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What one ``build_image`` call produced or found."""

    image: GoldenImage
    cached: bool
    recipe_digest: str
    total_s: float
    stages_s: dict[str, float] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    commands: list[RunResult] = dataclasses.field(default_factory=list)
    customize: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        m = self.image.manifest
        return {
            "image_digest": self.image.digest,
            "recipe_digest": self.recipe_digest,
            "cached": self.cached,
            "directory": str(self.image.directory),
            "kernel_version": m.kernel_version,
            "cmdline": m.cmdline,
            "packages": m.packages,
            "artifacts": {k: a.model_dump() for k, a in m.artifacts.items()},
            "rootfs": {"path": str(self.image.rootfs), "files": m.rootfs.files, "bytes": m.rootfs.bytes},
            "stages_s": self.stages_s,
            "sizes": self.sizes,
            "total_s": round(self.total_s, 2),
        }


class _Stages:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.start = time.monotonic()
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        begin = time.monotonic()
        self.progress(f"image build: {name} ...")
        yield
        took = time.monotonic() - begin
        self.times[name] = round(took, 2)
        self.progress(
            f"image build: {name} done in {took:.1f}s (elapsed {time.monotonic() - self.start:.1f}s)"
        )


def build_image(
    recipe: Recipe, store: Path, *, force: bool = False, progress: Progress | None = None
) -> BuildResult:
    """Build the image of ``recipe`` into ``store`` (or find it there) and return it.

    Raises ``OperationalError`` (``needs-root``, ``tool-missing``, ``image-customize-failed``,
    ``image-kernel-missing``, ``build-dir-mounted``), ``CommandFailed`` / ``CommandTimeout``
    from a tool, and ``RefusedError('image-unsafe')`` when SSH host keys survived the build.
    """
    say = progress or quiet
    started = time.monotonic()
    digest = recipe.digest()
    final = store / digest.removeprefix("sha256:")
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OperationalError(
            "image-store-unwritable",
            f"cannot create the image store {store}: {exc.strerror}",
            hint="pass --home DIR or point AVM_IMAGE_CACHE at a writable directory",
        ) from exc
    with imagestore.exclusive(store / f".{final.name}.lock", say):
        if not force and (final / MANIFEST).is_file():
            try:
                image = GoldenImage.load(final)
                image.check_present()
                _refuse_host_keys(image.rootfs)
                say(f"image build: cached image {image.digest} for recipe {digest}")
                total = time.monotonic() - started
                return BuildResult(image, True, digest, total, sizes=image_sizes(image))
            except (OperationalError, RefusedError) as exc:
                say(f"image build: cached image unusable ({exc.code}); rebuilding")
        _preflight()
        imagestore.remove_stale_builds(store, final.name, say)
        work = Path(tempfile.mkdtemp(prefix=f".build-{final.name[:12]}-", dir=store))
        try:
            built = _build_into(work, recipe, _Stages(say))
            imagestore.publish(work, final)
        finally:
            if work.exists():
                imagestore.remove_tree(work)
    image = GoldenImage.load(final)
    total = time.monotonic() - started
    say(f"image build: {image.digest} built in {total:.1f}s")
    built.sizes = {**image_sizes(image), **built.sizes}
    fields = {f.name: getattr(built, f.name) for f in dataclasses.fields(built)}
    return BuildResult(image, False, digest, total, **fields)


def _build_into(work: Path, recipe: Recipe, st: _Stages) -> _Built:
    rootfs = work / ROOTFS
    files = {name: work / file for name, file in ARTIFACT_FILES.items()}
    files["recipe"].write_bytes(canonical_bytes(recipe.model_dump(mode="json")))
    result = _Built()
    recipe_digest = recipe.digest()
    with st.stage("mmdebstrap"):
        result.commands.append(_mmdebstrap(work, rootfs, recipe, result))
    with st.stage("inspect"):
        _refuse_host_keys(rootfs)
        kernel_version = _copy_kernel(rootfs, files["kernel"], files["initrd"])
    with st.stage("sbom"):
        query = imagetools.dpkg_query(rootfs)
        result.commands.append(query)
        packages = sbom.parse_dpkg_query(query.stdout)
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        doc = sbom.spdx_document(
            packages, image_name=recipe.name, recipe_digest=recipe_digest, suite=recipe.suite, created=created
        )
        files["sbom"].write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with st.stage("tree"):
        listing, entries, rootfs_bytes = rootfs_tree(rootfs)
        files["rootfs-tree"].write_bytes(listing)
    with st.stage("mkfs"):
        result.commands.append(
            imagetools.mkfs_ext4(rootfs, files["raw"], label=recipe.disk.label, size_mib=recipe.disk.size_mib)
        )
    with st.stage("qcow2"):
        result.commands.append(imagetools.qemu_img_convert(files["raw"], files["qcow2"]))
    with st.stage("manifest"):
        artifacts = {
            name: Artifact(path=path.name, sha256=file_sha256(path), size=path.stat().st_size)
            for name, path in files.items()
        }
        manifest = ImageManifest(
            name=recipe.name,
            recipe_digest=recipe_digest,
            suite=recipe.suite,
            architecture=recipe.architecture,
            kernel_version=kernel_version,
            cmdline=recipe.boot.cmdline,
            built_at=created,
            packages=len(packages),
            artifacts=artifacts,
            rootfs=RootfsInfo(files=entries, bytes=rootfs_bytes),
            tools={
                "mmdebstrap": imagetools.tool_version(["mmdebstrap", "--version"]),
                "mkfs.ext4": imagetools.tool_version(["mkfs.ext4", "-V"]),
                "qemu-img": imagetools.tool_version(["qemu-img", "--version"]),
            },
        )
        (work / MANIFEST).write_bytes(manifest.canonical())
    result.stages_s = st.times
    removed = result.customize.get("kernel_modules", {}).get("versions", {})
    result.sizes = {"kernel_modules_removed_bytes": sum(v.get("removed_bytes", 0) for v in removed.values())}
    return result


def _mmdebstrap(work: Path, rootfs: Path, recipe: Recipe, result: _Built) -> RunResult:
    hook = work / "customize-hook"
    if any(c.isspace() for c in sys.executable):
        raise OperationalError(
            "python-path-unusable",
            f"the Python interpreter path {sys.executable!r} contains whitespace and cannot be a #! line",
            hint="create the virtualenv under a path without spaces",
        )
    hook.write_text(_HOOK_SHIM.format(python=sys.executable))
    hook.chmod(0o755)
    report = work / "customize-report.json"
    package_root = str(Path(controlplane.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env.update(
        {
            RECIPE_ENV: str(work / ARTIFACT_FILES["recipe"]),
            REPORT_ENV: str(report),
            "PYTHONPATH": os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p),
        }
    )
    trim = recipe.trim
    argv = imagetools.mmdebstrap_argv(
        suite=recipe.suite,
        target=rootfs,
        mirrors=recipe.sources(),
        variant=recipe.variant,
        architecture=recipe.architecture,
        components=recipe.components,
        packages=recipe.packages,
        dpkg_options=[
            *(f"path-exclude={p}" for p in trim.dpkg_path_exclude),
            *(f"path-include={p}" for p in trim.dpkg_path_include),
        ],
        customize_hooks=[hook],
    )
    try:
        run = imagetools.mmdebstrap(argv, env)
    except CommandFailed as exc:
        error = _read_json(report).get("error")
        if error:
            raise OperationalError(
                "image-customize-failed",
                f"the customize hook failed: [{error.get('code')}] {error.get('message')}",
                hint="fix the recipe setting it names; packages were installed, nothing was published",
                details={"hook_error": error, "rc": exc.rc, "stderr": exc.stderr[-4000:]},
            ) from exc
        raise
    result.customize = _read_json(report)
    return run


def image_sizes(image: GoldenImage) -> dict[str, int]:
    """Sizes worth watching (bytes): rootfs content, raw (apparent and allocated), qcow2, kernel."""
    arts = image.manifest.artifacts
    return {
        "rootfs_bytes": image.manifest.rootfs.bytes,
        "raw_apparent_bytes": arts["raw"].size,
        "raw_allocated_bytes": image.raw.stat().st_blocks * 512,
        "qcow2_bytes": arts["qcow2"].size,
        "kernel_bytes": arts["kernel"].size,
        "initrd_bytes": arts["initrd"].size,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _refuse_host_keys(rootfs: Path) -> None:
    keys = sorted(str(p.relative_to(rootfs)) for p in (rootfs / "etc/ssh").glob("ssh_host_*"))
    if keys:
        raise RefusedError(
            "image-unsafe",
            f"SSH host keys are present in the image ({', '.join(keys)}): every VM would share them",
            hint="rebuild with `avm image build --force`; the customize hook removes them",
            details={"keys": keys},
        )


def _copy_kernel(rootfs: Path, kernel: Path, initrd: Path) -> str:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise OperationalError(
            "image-kernel-missing",
            f"expected exactly one kernel in {rootfs / 'boot'}, found {[k.name for k in kernels]}",
            hint="the recipe must install exactly one kernel package (linux-image-cloud-amd64)",
        )
    version = kernels[0].name.removeprefix("vmlinuz-")
    ramdisk = rootfs / "boot" / f"initrd.img-{version}"
    if not ramdisk.is_file():
        raise OperationalError(
            "image-kernel-missing",
            f"{ramdisk} is missing: the kernel has no initramfs",
            hint="add initramfs-tools to the recipe's packages",
        )
    shutil.copyfile(kernels[0], kernel)
    shutil.copyfile(ramdisk, initrd)
    return version


def _preflight() -> None:
    if os.geteuid() != 0:
        raise OperationalError(
            "needs-root",
            "building the golden image needs root (mmdebstrap --mode=root, chroot, file ownership)",
            hint="run `avm image build` as root, or reuse an image store built by root via AVM_IMAGE_CACHE",
        )
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise OperationalError(
            "tool-missing",
            f"the image build needs {', '.join(missing)}",
            hint="run `make setup` as root (it installs mmdebstrap, e2fsprogs and qemu-utils)",
            details={"missing": missing},
        )


def build_and_record(
    home: Home, recipe: Recipe, *, source: str, force: bool = False, progress: Progress | None = None
) -> tuple[BuildResult, str | None]:
    """Build (or find) the image and write an ``image-build`` receipt. Returns (result, receipt id).

    The receipt's subject is the image digest; it records the tool commands, stage timings,
    sizes and whether the image came from the cache. Raises what ``build_image`` raises (the
    receipt then says ``failed`` or ``refused``).
    """
    from controlplane.evidence import step as evidence

    store = image_store(home)
    inputs = {"recipe": source, "recipe_digest": recipe.digest(), "force": force, "store": str(store)}
    with evidence.record_step(home, "image-build", inputs=inputs) as step:
        result = build_image(recipe, store, force=force, progress=progress)
        step.subject(f"image:{recipe.name}", result.image.digest)
        for command in result.commands:
            step.command(command)
        step.observe("cached", result.cached)
        step.observe("stages_s", result.stages_s)
        step.observe("sizes", result.sizes)
        step.observe("kernel_version", result.image.manifest.kernel_version)
        step.observe("artifacts", {k: a.sha256 for k, a in result.image.manifest.artifacts.items()})
        if result.customize:
            step.observe("customize", result.customize)
        step.check("no-ssh-host-keys-in-rootfs", ok=True, detail="no etc/ssh/ssh_host_* in the image rootfs")
        step.non_claim("the image was not booted by this step")
        step.non_claim("Debian package signatures were checked by apt against the host keyring, not by avm")
        if result.cached:
            step.non_claim("a cached image was checked by file presence and size, not re-hashed")
        step.result.update(result.summary())
    return result, step.receipt_id
