"""Golden VMs for integration tests: a real systemd + sshd host under nspawn (and QEMU).

``golden_home`` is an avm home with a receipt key and the shared golden image store;
``nspawn_vm`` boots one container VM per test module and tears it down (verified) after.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.evidence import keys
from controlplane.home import Home
from tests.plugins.require import require_root, require_tools

AVM = [sys.executable, "-m", "controlplane"]


def run_avm(
    home: Home, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, as an operator runs it."""
    full_env = {**os.environ, "AVM_HOME": str(home.root), **(env or {})}
    return subprocess.run(
        [*AVM, "--home", str(home.root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )


def run_avm_json(home: Home, *args: str, timeout: float = 600) -> tuple[int, dict[str, Any]]:
    """``avm --json ARGS``: the exit code and the one JSON document (stderr when there is none)."""
    out = run_avm(home, "--json", *args, timeout=timeout)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {"stderr": out.stderr}


def last_receipt(home: Home, kind: str) -> dict[str, Any]:
    """The predicate of the newest receipt of ``kind`` in ``home``."""
    rc, listed = run_avm_json(home, "receipts", "list")
    assert rc == 0, listed
    seq = [r["seq"] for r in listed["receipts"] if r["kind"] == kind][-1]
    rc, shown = run_avm_json(home, "receipts", "show", str(seq))
    assert rc == 0, shown
    predicate: dict[str, Any] = shown["statement"]["predicate"]
    return predicate


def needs_root_and_nspawn() -> None:
    require_root("nspawn VMs")
    require_tools("systemd-nspawn")


@pytest.fixture(scope="session")
def snapshot_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One booted-snapshot store for the whole run: the first qemu ``vm up`` of the run boots
    cold and makes the snapshot, every later one (in any module) restores it (warm start)."""
    from controlplane.vm.snapshot import SNAPSHOT_CACHE_ENV

    path = tmp_path_factory.mktemp("snapshots")
    os.environ[SNAPSHOT_CACHE_ENV] = str(path)
    return path


@pytest.fixture(scope="module")
def golden_home(tmp_path_factory: pytest.TempPathFactory, golden_image: object, snapshot_store: Path) -> Home:
    """A fresh avm home (receipt key made) that uses the session's golden image and snapshots."""
    from tests.plugins.golden import shared_image_store

    # CLI subprocesses find the shared image store through the environment
    os.environ.setdefault("AVM_IMAGE_CACHE", str(shared_image_store()))
    home = Home(tmp_path_factory.mktemp("golden-home") / "avm").ensure()
    keys.init(home)
    return home


@pytest.fixture(scope="module")
def nspawn_vm(golden_home: Home) -> Iterator[str]:
    """One running nspawn golden VM for the module; its teardown must leave nothing."""
    needs_root_and_nspawn()
    # unique per run: another avm test run on this machine makes VMs of its own
    name = "t" + secrets.token_hex(4)
    out = run_avm(golden_home, "vm", "up", name, "--backend", "nspawn", "--timeout", "120")
    assert out.returncode == 0, out.stderr
    yield name
    down = run_avm(golden_home, "vm", "down", name)
    assert down.returncode == 0, down.stdout + down.stderr


LIBVIRTD_LOCK = Path("/run/avm-test-libvirtd.lock")


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """A libvirtd serving qemu:///system: the running one, else virtlogd + libvirtd started by hand
    (this kind of host has no systemd as PID 1). Every module that uses it, in this run or in
    another test run on the machine (pytest-xdist workers included), holds a shared lock on
    ``LIBVIRTD_LOCK``; the last one out stops daemons a test started, never the host's own."""
    import libvirt

    def serving() -> bool:
        try:
            libvirt.open("qemu:///system").close()
            return True
        except libvirt.libvirtError:
            return False

    pidfiles = {d: Path(f"/run/avm-test-{d}.pid") for d in ("virtlogd", "libvirtd")}
    with LIBVIRTD_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one module at a time decides whether to start them
        try:
            if not serving():
                require_root("starting libvirtd")
                require_tools("libvirtd", "virtlogd")
                for daemon, pidfile in pidfiles.items():
                    subprocess.run([daemon, "-d", "-p", str(pidfile)], check=True, timeout=60)
                deadline = time.monotonic() + 30
                while not serving():
                    assert time.monotonic() < deadline, "libvirtd did not come up"
                    time.sleep(0.2)
        finally:
            fcntl.flock(lock, fcntl.LOCK_SH)  # in use (a downgrade: never unlocked in between)
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another module still uses it: the last one stops it
        for pidfile in pidfiles.values():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
                pidfile.unlink()
