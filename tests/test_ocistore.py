"""The OCI job image store: pins, tampering, import, and layer unpacking with whiteouts (no VM)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from controlplane.errors import RefusedError, UsageError
from controlplane.home import Home
from controlplane.jobs.oci import layers as ocilayers
from controlplane.jobs.oci import store as ocistore


def layer(entries: list[tuple[str, str, str]]) -> bytes:
    """(path, kind, content-or-linkname) -> a gzipped tar layer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, kind, data in entries:
            info = tarfile.TarInfo(path)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data.encode()))
    return gzip.compress(buf.getvalue())


def image_of(home: Home, layers: list[bytes]) -> ocistore.StoredImage:
    store = ocistore.store_dir(home)
    descs = [
        {"mediaType": ocistore.LAYER_GZ, "digest": ocistore.put_blob(store, b), "size": len(b)}
        for b in layers
    ]
    manifest = {"schemaVersion": 2, "layers": descs}
    return ocistore.StoredImage(name="t", digest="sha256:" + "0" * 64, manifest=manifest)


def test_whiteouts_and_opaque_dirs_remove_lower_layer_files(home: Home, tmp_path: Path) -> None:
    lower = layer([("etc", "dir", ""), ("etc/keep", "f", "k"), ("etc/gone", "f", "g"),
                   ("opt", "dir", ""), ("opt/a", "f", "a"), ("opt/b", "f", "b")])  # fmt: skip
    upper = layer([("etc/.wh.gone", "f", ""), ("opt/.wh..wh..opq", "f", ""), ("opt/c", "f", "c")])
    root = tmp_path / "root"
    ocilayers.unpack(ocistore.store_dir(home), image_of(home, [lower, upper]), root)
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["keep"]
    assert sorted(p.name for p in (root / "opt").iterdir()) == ["c"]


@pytest.mark.parametrize(
    "entries",
    [
        [("../escape", "f", "x")],
        [("/abs", "f", "x")],
        [("link", "sym", "/etc"), ("link/passwd", "f", "pwned")],
    ],
    ids=["dotdot", "absolute", "through-symlink"],
)
def test_members_that_escape_the_root_are_refused(
    home: Home, tmp_path: Path, entries: list[tuple[str, str, str]]
) -> None:
    root = tmp_path / "root"
    with pytest.raises(RefusedError) as err:
        ocilayers.unpack(ocistore.store_dir(home), image_of(home, [layer(entries)]), root)
    assert err.value.code == "image-layer-unsafe"
    assert not (tmp_path / "escape").exists()


def test_pins_are_exact_and_tampered_blobs_are_refused(home: Home, tmp_path: Path) -> None:
    src = tmp_path / "f.txt"
    src.write_text("x")
    image = ocistore.build_job_image(home, "avm/t", {"f.txt": src})
    assert ocistore.resolve(home, image.ref).digest == image.digest
    with pytest.raises(UsageError, match="not pinned"):
        ocistore.resolve(home, "avm/t:latest")
    with pytest.raises(RefusedError) as wrong:
        ocistore.resolve(home, "avm/other@" + image.digest)
    assert wrong.value.code == "image-digest-mismatch"
    blob = ocistore.store_dir(home) / "blobs" / "sha256" / image.digest.split(":")[1]
    blob.write_bytes(blob.read_bytes() + b" ")
    with pytest.raises(RefusedError) as bad:
        ocistore.resolve(home, image.ref)
    assert bad.value.code == "oci-blob-corrupt"


def test_import_rehashes_every_blob(home: Home, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    config = {"digest": "sha256:" + hashlib.sha256(b"{}").hexdigest()}
    manifest = json.dumps({"schemaVersion": 2, "config": config, "layers": []}).encode()
    (layout / "blobs" / "sha256" / hashlib.sha256(b"{}").hexdigest()).write_bytes(b"{} tampered")
    digest = hashlib.sha256(manifest).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(manifest)
    entry = {
        "mediaType": ocistore.MANIFEST_TYPE,
        "digest": f"sha256:{digest}",
        "annotations": {ocistore.REF_NAME: "x"},
    }
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    with pytest.raises(RefusedError) as err:
        ocistore.import_layout(home, layout)
    assert err.value.code == "oci-blob-corrupt"
    with pytest.raises(UsageError):
        ocistore.import_layout(home, tmp_path)


def test_kata_gets_the_pinned_image_as_an_oci_archive_with_the_same_digest(
    home: Home, tmp_path: Path
) -> None:
    from controlplane.home import Home as H
    from controlplane.jobs.runtime import kata

    src = tmp_path / "f.txt"
    src.write_text("x")
    image = ocistore.resolve(home, ocistore.build_job_image(home, "avm/k", {"f.txt": src}).ref)
    archive = tmp_path / "image.tar"
    ocistore.export_archive(home, image, archive, "avm/k:avm-test")
    [back] = ocistore.import_layout(H(tmp_path / "other").ensure(), archive)
    assert back.digest == image.digest and back.name == "avm/k"
    argv = kata.ctr_argv("avm/k:avm-test", "c1", ["sh", "-c", "exit 3"], {"A": "1"}, "/run/c.sock")
    assert argv[argv.index("--runtime") + 1] == "io.containerd.kata.v2"
    assert argv[-5:] == ["avm/k:avm-test", "c1", "sh", "-c", "exit 3"]
