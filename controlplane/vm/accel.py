"""The QEMU accelerator this host can really use, and the host TSC rate a TCG guest needs.

``/dev/kvm`` existing proves nothing (on these machines it cannot run stock kernels), so the
answer comes from a short probe boot, cached per kernel digest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from controlplane.errors import OperationalError

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT_S = 10.0
PROBE_CACHE = Path("/var/tmp/avm-accel-probe")  # a fact about this host and kernel, shared by homes


def host_tsc_khz(cpuinfo: str) -> int | None:
    """The host TSC in kHz, from the ``cpu MHz`` line of /proc/cpuinfo text (TCG has no better
    source); ``None`` when there is no such line or it does not parse."""
    for line in cpuinfo.splitlines():
        if line.startswith("cpu MHz"):
            try:
                return round(float(line.split(":", 1)[1]) * 1000)
            except ValueError:
                return None
    return None


def require_tsc_khz(cpuinfo: str) -> int:
    """``host_tsc_khz``, or ``OperationalError('cpuinfo-unparsed')`` (a microvm guest needs it)."""
    khz = host_tsc_khz(cpuinfo)
    if khz is None:
        raise OperationalError("cpuinfo-unparsed", "no parsable 'cpu MHz' line in /proc/cpuinfo")
    return khz


def probe_cache() -> Path:
    """Where the accelerator probe's answer is kept: per host boot (``boot_id``), shared by every
    avm home, so a probe that takes seconds (a hanging ``-accel kvm``) runs once per boot."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    path = PROBE_CACHE / boot_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def probe_accel(kernel: Path, busybox: Path, cache: Path | None = None) -> str:
    """``kvm`` if a probe guest boots and powers off under KVM within 10 s, else ``tcg``.

    ``AVM_ACCEL`` overrides; the answer is cached per kernel digest in ``cache`` (default:
    ``probe_cache()``, per host boot)."""
    forced = os.environ.get("AVM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    from controlplane._internal.archive import write_cpio
    from controlplane.image.golden import file_sha256

    cache = cache if cache is not None else probe_cache()
    key = cache / f"accel-{file_sha256(kernel).split(':')[1][:16]}.json"
    if key.is_file():
        return str(json.loads(key.read_text())["accel"])
    with tempfile.TemporaryDirectory(prefix="avm-kvm-probe-") as tmp:
        root = Path(tmp) / "root"
        (root / "bin").mkdir(parents=True)
        shutil.copy(busybox, root / "bin" / "busybox")
        (root / "init").write_text(
            "#!/bin/busybox sh\n/bin/busybox echo avm-kvm-probe-ok\n/bin/busybox reboot -f\n"
        )
        os.chmod(root / "init", 0o755)  # noqa: S103 - the probe guest runs it
        write_cpio(root, Path(tmp) / "probe.cpio")
        # microvm without ACPI boots both guest kernels (the minimal one has no ACPI or PCI)
        argv = [QEMU, "-M", "microvm,pit=on,acpi=off", "-accel", "kvm", "-m", "128", "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
                "-kernel", str(kernel), "-initrd", f"{tmp}/probe.cpio",
                "-append", "console=ttyS0 quiet reboot=t panic=-1"]  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
            accel = "kvm" if b"avm-kvm-probe-ok" in proc.stdout and proc.returncode == 0 else "tcg"
        except subprocess.TimeoutExpired:
            accel = "tcg"
    cache.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps({"accel": accel, "probed_at": time.time()}))
    return accel
