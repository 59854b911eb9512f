"""The ``qemu`` runtime on another host (``--target VM``): same QEMU command, through the transport.

The kernel and initramfs are uploaded with ``put``, QEMU runs under the transport's own deadline
(``timeout -k`` remotely), the result file comes back with ``get``, and the remote work dir is
removed and checked. Output is not live here: the transport returns it when QEMU exits.
"""

from __future__ import annotations

import time

from controlplane.errors import CommandTimeout, OperationalError
from controlplane.evidence.step import Check
from controlplane.jobs.runtime import Launch, Outcome
from controlplane.jobs.runtime.qemu import qemu_argv
from controlplane.transport.base import Transport
from controlplane.vm.accel import require_tsc_khz

REMOTE_BASE = "/var/tmp/avm-jobs"


def run_remote(transport: Transport, launch: Launch, accel: str) -> Outcome:
    """Raises ``OperationalError('tool-missing')`` when the host has no QEMU."""
    rdir = f"{REMOTE_BASE}/{launch.marker}"
    if not transport.run(["sh", "-c", "command -v qemu-system-x86_64"], timeout=30).ok:
        raise OperationalError(
            "tool-missing",
            f"qemu-system-x86_64 is not installed on {transport.url}",
            hint="rebuild the golden image",
        )
    tsc = require_tsc_khz(transport.run(["cat", "/proc/cpuinfo"], timeout=30).check().stdout)
    transport.run(["mkdir", "-p", "-m", "0700", rdir], timeout=30).check()
    transport.put(launch.kernel.read_bytes(), f"{rdir}/kernel")
    transport.put(launch.initramfs.read_bytes(), f"{rdir}/initramfs.cpio")
    transport.put(b"", f"{rdir}/result.tar")
    argv = qemu_argv(
        launch, accel=accel, tsc_khz=tsc, result_path=f"{rdir}/result.tar",
        kernel=f"{rdir}/kernel", initrd=f"{rdir}/initramfs.cpio",
    )  # fmt: skip
    if launch.netns:
        argv = ["ip", "netns", "exec", launch.netns, *argv]
    start = time.monotonic()
    timed_out, rc, console = False, None, ""
    try:
        try:
            res = transport.run(argv, timeout=launch.timeout_s)
            rc, console = res.rc, res.stdout + res.stderr
        except CommandTimeout as exc:
            timed_out = True
            console = str(exc.details.get("stdout", ""))
        wall = time.monotonic() - start
        result = b"" if timed_out else transport.get(f"{rdir}/result.tar")
    finally:
        transport.run(["pkill", "-KILL", "-f", launch.marker], timeout=30)
        transport.run(["rm", "-rf", rdir], timeout=60)
    result_path = launch.workdir / "result.tar"
    result_path.write_bytes(result[: launch.result_max])
    log = launch.workdir / "console.log"
    log.write_text(console)
    if launch.stream is not None:
        for line in console.splitlines():
            launch.stream(line)
    left = transport.run(["pgrep", "-f", launch.marker], timeout=30).stdout.split()
    gone = transport.run(["test", "-e", rdir], timeout=30).rc != 0
    return Outcome(
        timed_out=timed_out, qemu_rc=rc, result_path=result_path, console_log=log, wall_s=wall, accel=accel,
        machine=launch.machine, argv=argv,
        checks=[
            Check("remote-qemu-process-gone", not left, f"{transport.url}: pids {left}"),
            Check("remote-workdir-removed", gone, f"{transport.url}:{rdir}"),
        ],
    )  # fmt: skip
