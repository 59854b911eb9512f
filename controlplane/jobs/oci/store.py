"""The local OCI image layout store: import, build small job images from files, resolve pins.

Layout (an OCI image layout, so ``skopeo``/``umoci`` read it as is)::

    <home>/oci/oci-layout, index.json     one entry per (name, manifest digest),
                                          name in annotation org.opencontainers.image.ref.name
    <home>/oci/blobs/sha256/<hex>         content-addressed blobs, re-hashed whenever read

A job names its image as ``NAME@sha256:<hex>``: the manifest blob is read, re-hashed, and must
equal the pin exactly; tags are never looked up.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from controlplane._internal.archive import Member, tar_bytes, write_tar
from controlplane._internal.fs import write_atomic
from controlplane.errors import RefusedError, UsageError
from controlplane.home import Home

REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclasses.dataclass(frozen=True)
class StoredImage:
    name: str
    digest: str  # sha256:<hex> of the exact manifest bytes
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.digest}"

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("layers", []))


def store_dir(home: Home) -> Path:
    return home.root / "oci"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob_path(store: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise RefusedError("oci-digest-invalid", f"not a sha256 digest: {digest!r}")
    return store / "blobs" / "sha256" / hexpart


def read_blob(store: Path, digest: str) -> bytes:
    """The blob's bytes after checking they hash to ``digest``.

    Raises ``RefusedError('oci-blob-missing' | 'oci-blob-corrupt')``."""
    path = _blob_path(store, digest)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RefusedError(
            "oci-blob-missing", f"blob {digest} is not in {store}", hint="re-import the image"
        ) from None
    if _digest(data) != digest:
        raise RefusedError(
            "oci-blob-corrupt",
            f"blob {path} hashes to {_digest(data)}, expected {digest}",
            hint="the store was modified; re-import the image",
            details={"expected": digest, "actual": _digest(data)},
        )
    return data


def verify_blob(store: Path, digest: str) -> None:
    """Re-hash a blob on disk in chunks (no whole-blob read). Raises what ``read_blob`` raises."""
    path = _blob_path(store, digest)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise RefusedError(
            "oci-blob-missing", f"blob {digest} is not in {store}", hint="re-import the image"
        ) from None
    actual = "sha256:" + h.hexdigest()
    if actual != digest:
        raise RefusedError(
            "oci-blob-corrupt",
            f"blob {path} hashes to {actual}, expected {digest}",
            hint="the store was modified; re-import the image",
            details={"expected": digest, "actual": actual},
        )


def put_blob(store: Path, data: bytes) -> str:
    digest = _digest(data)
    path = _blob_path(store, digest)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    return digest


def _index(store: Path) -> dict[str, Any]:
    path = store / "index.json"
    if not path.is_file():
        return {"schemaVersion": 2, "manifests": []}
    doc: dict[str, Any] = json.loads(path.read_bytes())
    return doc


def _add_to_index(store: Path, name: str, digest: str, size: int) -> None:
    store.mkdir(parents=True, exist_ok=True)
    write_atomic(store / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    index = _index(store)
    entries = [
        e
        for e in index["manifests"]
        if not (e.get("annotations", {}).get(REF_NAME) == name and e["digest"] == digest)
    ]
    entries.append(
        {"mediaType": MANIFEST_TYPE, "digest": digest, "size": size, "annotations": {REF_NAME: name}}
    )
    index["manifests"] = entries
    write_atomic(store / "index.json", (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def list_images(home: Home) -> list[StoredImage]:
    store = store_dir(home)
    out = []
    for entry in _index(store)["manifests"]:
        name = entry.get("annotations", {}).get(REF_NAME, "")
        out.append(StoredImage(name=name, digest=entry["digest"], manifest={}))
    return out


def resolve(home: Home, ref: str) -> StoredImage:
    """``NAME@sha256:<hex>`` -> the stored image whose manifest bytes hash to exactly that digest.

    Raises ``UsageError('image-unpinned')`` for a tag or bare name, and
    ``RefusedError('image-digest-mismatch')`` when the store holds NAME only under other digests
    (or not at all)."""
    name, sep, pin = ref.partition("@")
    if not sep or not pin.startswith("sha256:"):
        raise UsageError(
            "image-unpinned", f"image {ref!r} is not pinned", hint="name images as NAME@sha256:<64 hex>"
        )
    store = store_dir(home)
    known = [e for e in _index(store)["manifests"] if e.get("annotations", {}).get(REF_NAME) == name]
    if not any(e["digest"] == pin for e in known):
        raise RefusedError(
            "image-digest-mismatch",
            f"image {name}: pinned {pin}, the store has {[e['digest'] for e in known] or 'no such image'}",
            hint="import the image with `avm image import`, or fix the pin in the job spec",
            details={"expected": pin, "actual": [e["digest"] for e in known]},
        )
    data = read_blob(store, pin)  # re-hashed: the manifest bytes themselves must equal the pin
    return StoredImage(name=name, digest=pin, manifest=json.loads(data))


def import_layout(home: Home, source: Path, name: str | None = None) -> list[StoredImage]:
    """Import every image manifest of an OCI layout directory or a tar of one (oci-archive).

    Every blob is re-hashed on the way in. Raises ``UsageError('oci-layout-invalid')`` when the
    source is not an OCI layout, ``RefusedError('oci-blob-corrupt')`` for a blob that lies."""
    if source.is_file():
        with tempfile.TemporaryDirectory(prefix="avm-oci-import-") as tmp:
            try:
                with tarfile.open(source) as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise UsageError("oci-layout-invalid", f"{source} is not a readable tar: {exc}") from exc
            return import_layout(home, Path(tmp), name)
    index_path = source / "index.json"
    if not (source / "oci-layout").is_file() or not index_path.is_file():
        raise UsageError(
            "oci-layout-invalid",
            f"{source} is not an OCI image layout (no oci-layout / index.json)",
            hint="pass a directory made by `skopeo copy ... oci:DIR` or `umoci`, or a tar of one",
        )
    store = store_dir(home)
    imported = []
    for entry in json.loads(index_path.read_bytes()).get("manifests", []):
        if entry.get("mediaType") != MANIFEST_TYPE:
            raise UsageError(
                "oci-layout-invalid",
                f"{source}: {entry.get('digest')} is {entry.get('mediaType')}, expected {MANIFEST_TYPE}",
                hint="import a single-platform image (skopeo copy --override-arch amd64)",
            )
        ref_name = name or entry.get("annotations", {}).get(REF_NAME)
        if not ref_name:
            raise UsageError("oci-layout-invalid", f"{source}: an image has no ref name", hint="pass --name")
        manifest_bytes = read_blob(source, entry["digest"])
        manifest = json.loads(manifest_bytes)
        for blob in [manifest["config"], *manifest.get("layers", [])]:
            put_blob(store, read_blob(source, blob["digest"]))
        digest = put_blob(store, manifest_bytes)
        _add_to_index(store, ref_name.split(":")[0], digest, len(manifest_bytes))
        imported.append(StoredImage(name=ref_name.split(":")[0], digest=digest, manifest=manifest))
    return imported


def _layer_tar(files: dict[str, tuple[bytes, int]], symlinks: dict[str, str]) -> bytes:
    dirs = sorted(
        {str(Path(p).parents[i]) for p in [*files, *symlinks] for i in range(len(Path(p).parts) - 1)}
    )
    return tar_bytes(
        [
            *(Member(d, mode=0o755, directory=True) for d in dirs),
            *(Member(p, data, mode) for p, (data, mode) in sorted(files.items())),
            *(Member(p, t.encode(), 0o777, symlink=True) for p, t in sorted(symlinks.items())),
        ]
    )


def _applets(busybox: Path) -> list[str]:
    import subprocess

    proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=30, check=False)
    return [a for a in proc.stdout.split() if a != "busybox"]


def build_job_image(
    home: Home,
    name: str,
    files: dict[str, Path],
    *,
    busybox: Path | None = None,
    cmd: list[str] | None = None,
) -> StoredImage:
    """Build a one-layer image from host files (``dest-in-image -> source``), optionally with a
    static busybox at /bin/busybox and its applets (/bin/sh, ...) linked in /bin. Deterministic:
    the same inputs give the same digest. Raises ``UsageError('image-file-unreadable')``."""
    content: dict[str, tuple[bytes, int]] = {}
    links: dict[str, str] = {}
    if busybox is not None:
        files = {"bin/busybox": busybox, **files}
        links = {f"bin/{a}": "busybox" for a in _applets(busybox) if "/" not in a and f"bin/{a}" not in files}
        links["bin/sh"] = "busybox"
    for dest, src in files.items():
        clean = dest.lstrip("/")
        if not clean or ".." in Path(clean).parts:
            raise UsageError("image-file-invalid", f"destination {dest!r} must stay inside the image root")
        try:
            content[clean] = (src.read_bytes(), 0o755 if src.stat().st_mode & 0o111 else 0o644)
        except OSError as exc:
            raise UsageError("image-file-unreadable", f"cannot read {src}: {exc.strerror}") from exc
    raw = _layer_tar(content, links)
    layer = gzip.compress(raw, compresslevel=6, mtime=0)
    store = store_dir(home)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": cmd or ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(raw)]},
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": CONFIG_TYPE,
            "digest": put_blob(store, config_bytes),
            "size": len(config_bytes),
        },
        "layers": [{"mediaType": LAYER_GZ, "digest": put_blob(store, layer), "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    digest = put_blob(store, manifest_bytes)
    _add_to_index(store, name, digest, len(manifest_bytes))
    return StoredImage(name=name, digest=digest, manifest=manifest)


def export_archive(home: Home, image: StoredImage, dest: Path, ref_name: str) -> None:
    """Write ``image`` as an oci-archive tar (``ctr images import`` reads it) named ``ref_name``."""
    store = store_dir(home)
    manifest_bytes = read_blob(store, image.digest)
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MANIFEST_TYPE, "digest": image.digest, "size": len(manifest_bytes),
                       "annotations": {REF_NAME: ref_name}}],
    }  # fmt: skip
    blobs = [image.digest, image.manifest["config"]["digest"], *(layer["digest"] for layer in image.layers)]
    members = [
        Member("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        Member("index.json", json.dumps(index).encode()),
        *(Member("blobs/sha256/" + d.split(":")[1], read_blob(store, d)) for d in blobs),
    ]
    with open(dest, "wb") as fh:
        write_tar(fh, members)
