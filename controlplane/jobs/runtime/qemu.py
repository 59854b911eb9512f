"""The ``qemu`` Tier-2 runtime: QEMU launched directly, output streamed live, killed at the deadline.

Measured here (lab notes, re-measured by bench/jobs.py): ``-M microvm`` boots a job faster than
``q35`` under TCG (3.2 s vs 3.7 s with the cloud kernel), so microvm is the default; it needs
``tsc_early_khz=<host kHz>`` or it hangs on about 2 boots of 3. KVM is used only when a short
probe boot under KVM completes (on this host ``-accel kvm`` hangs: kvm_pvm).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from controlplane.errors import OperationalError
from controlplane.jobs.runtime import CONSOLE_LOG_MAX, Launch, Outcome
from controlplane.transport.base import Transport
from controlplane.vm.accel import QEMU, require_tsc_khz

MACHINES = ("microvm", "q35")
PR_SET_PDEATHSIG = 1
STREAM_LINE_MAX = 4096


def qemu_argv(
    launch: Launch, *, accel: str, tsc_khz: int, result_path: str, kernel: str, initrd: str
) -> list[str]:
    """The QEMU command for a job. Pure: no I/O."""
    append = ["console=ttyS0", "quiet", "panic=-1", "reboot=t", "rdinit=/.avm/init"]
    if launch.machine == "microvm":
        machine, serial_dev = "microvm,pit=on" + ("" if launch.acpi else ",acpi=off"), "virtio-serial-device"
        append.append(f"tsc_early_khz={tsc_khz}")
    else:
        machine, serial_dev = "q35", "virtio-serial-pci"
    if launch.extra_append:
        append.extend(launch.extra_append.split())
    return [
        QEMU, "-name", launch.marker, "-M", machine, "-accel", accel,
        "-m", str(launch.memory_mib), "-smp", str(launch.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", kernel, "-initrd", initrd, "-append", " ".join(append),
        "-chardev", f"file,id=avmres,path={result_path}",
        "-device", serial_dev, "-device", "virtserialport,chardev=avmres,name=avm.result",
        *launch.net_args,
    ]  # fmt: skip


class QemuRuntime:
    name = "qemu"

    def __init__(self, transport: Transport | None = None, accel: str = "tcg") -> None:
        self.transport = transport
        self.accel = accel

    def leftovers(self, marker: str) -> list[str]:
        from controlplane.vm.procs import pids_with_marker

        return [f"process {pid}" for pid in pids_with_marker(marker)]

    def run(self, launch: Launch) -> Outcome:
        """Boot the job guest; kill it at the deadline. Raises ``OperationalError('tool-missing')``
        when QEMU is not installed."""
        if self.transport is not None and self.transport.url != "local://":
            from controlplane.jobs.runtime.remote import run_remote

            return run_remote(self.transport, launch, self.accel)
        if shutil.which(QEMU) is None:
            raise OperationalError(
                "tool-missing", f"{QEMU} is not installed", hint="apt-get install qemu-system-x86"
            )
        result = launch.workdir / "result.tar"
        result.write_bytes(b"")
        tsc = require_tsc_khz(Path("/proc/cpuinfo").read_text())
        argv = qemu_argv(launch, accel=self.accel, tsc_khz=tsc, result_path=str(result),
                         kernel=str(launch.kernel), initrd=str(launch.initramfs))  # fmt: skip
        if launch.netns:
            argv = ["ip", "netns", "exec", launch.netns, *argv]
        log_path = launch.workdir / "console.log"
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),  # prctl only: safe with threads
        )
        (launch.workdir / "qemu.pid").write_text(str(proc.pid))
        assert proc.stdout is not None
        pump = _Pump(launch)
        with open(log_path, "wb") as log:
            reader = threading.Thread(target=pump.run, args=(proc.stdout, log), daemon=True)
            reader.start()
            rc, rss, timed_out, overflow = _wait(proc, start + launch.timeout_s, result, launch.result_max)
            reader.join(timeout=5)
        return Outcome(
            timed_out=timed_out,
            qemu_rc=rc,
            result_path=result,
            console_log=log_path,
            wall_s=time.monotonic() - start,
            accel=self.accel,
            machine=launch.machine,
            argv=argv,
            peak_rss_kib=rss,
            pid=proc.pid,
            console_bytes_seen=pump.seen,
            result_overflow=overflow,
        )


def _die_with_parent(parent: int) -> Callable[[], None]:
    """QEMU gets SIGKILL the moment the runner dies (PR_SET_PDEATHSIG), even by ``kill -9``.

    The signal follows the *thread* that forked: the thread that starts QEMU also waits for it."""

    import ctypes

    # resolved before the fork: the child only makes the call (no dlopen between fork and exec)
    prctl, sig = ctypes.CDLL(None, use_errno=True).prctl, int(signal.SIGKILL)

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(127)  # the runner is already gone: do not start a guest nobody supervises

    return preexec


class _Pump:
    """Console bytes from QEMU into the log, in chunks: at most CONSOLE_LOG_MAX bytes are kept,
    every byte is counted, and a line streamed live is cut at STREAM_LINE_MAX (a flood without
    newlines never accumulates)."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.seen = 0
        self.partial = b""

    def run(self, stream: IO[bytes], log: IO[bytes]) -> None:
        fd = stream.fileno()
        while chunk := os.read(fd, 1 << 16):
            kept = max(0, min(len(chunk), CONSOLE_LOG_MAX - self.seen))
            self.seen += len(chunk)
            if kept:
                log.write(chunk[:kept])
                log.flush()
                self._stream(chunk[:kept])
        if self.partial:
            self._emit(self.partial)

    def _stream(self, data: bytes) -> None:
        if self.launch.stream is None:
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            self._emit(line)
        while len(self.partial) >= STREAM_LINE_MAX:
            self._emit(self.partial[:STREAM_LINE_MAX])
            self.partial = self.partial[STREAM_LINE_MAX:]

    def _emit(self, line: bytes) -> None:
        assert self.launch.stream is not None
        self.launch.stream(line.decode("utf-8", "replace").rstrip("\r"))


def _wait(
    proc: subprocess.Popen[bytes], deadline: float, result: Path, result_max: int
) -> tuple[int | None, int, bool, bool]:
    """Wait for QEMU; SIGKILL its process group at the deadline, or as soon as the result port
    holds more than ``result_max`` bytes. Returns (rc, peak RSS KiB, timed_out, overflow)."""
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, int(usage.ru_maxrss), False, False
            timed_out = time.monotonic() >= deadline
            overflow = not timed_out and result.stat().st_size > result_max
            if timed_out or overflow:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                return None, int(usage.ru_maxrss), timed_out, overflow
            time.sleep(0.02)
    except BaseException:
        # interrupted (SIGINT/SIGTERM): the guest must not outlive the runner
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise
