"""The ``qemu`` backend (the default): the golden image booted by QEMU, KVM when usable, else TCG.

Each VM boots from its own qcow2 overlay, with the image's kernel and a small busybox initramfs
(``vm.initramfs``) that installs the identity gate (``avm.identity=gate``): sshd runs on a
throwaway host key, but the host forwards no port to it until it has written this VM's identity
to a virtio-serial port (``vm.identity``). That lets a VM
start warm, restored from a booted snapshot of the same image, QEMU and arguments
(``vm.warm``, ``vm.snapshot``), with its own identity delivered after the restore.
SSH is forwarded from a free 127.0.0.1 port by user-mode networking; the serial console goes
to ``serial.log`` in the VM's state dir; a QMP socket there gives a clean ACPI power-off.
``-M microvm`` boots faster than q35 under TCG and needs
``tsc_early_khz`` on its kernel cmdline (without it, about 2 boots in 3 hang).

The accelerator comes from a short probe boot (``vm.accel.probe_accel``, cached per
kernel): on hosts where ``/dev/kvm`` is PVM-only, ``-accel kvm`` hangs, so a probe that does not
finish in time means TCG. Nested virtualization needs KVM (``-cpu host``); under TCG the
receipt says it is unavailable.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane.errors import OperationalError
from controlplane.evidence.step import Check
from controlplane.vm import identity, initramfs, procs, snapshot, warm
from controlplane.vm.accel import QEMU
from controlplane.vm.base import Booted, BootRequest, VmRecord, VmSpec
from controlplane.vm.seed import placeholder_tar

QEMU_IMG = "qemu-img"
MACHINE = "microvm"
PLACEHOLDER = "placeholder-hostkey.tar"
NETWORKD_MASKED = "systemd.mask=systemd-networkd.service systemd.mask=systemd-networkd.socket"


def _tool_missing(tool: str) -> OperationalError:
    return OperationalError(
        "tool-missing",
        f"`{tool}` is not installed",
        hint="install qemu-system-x86 and qemu-utils (`make setup` does it as root)",
    )


def qemu_argv(request: BootRequest, *, accel: str, tsc_khz: int, initrd: Path) -> list[str]:
    """The full QEMU command line for one golden VM (pure)."""
    state = request.state_dir
    # QEMU user networking always gives the guest 10.0.2.15/24 behind 10.0.2.2; the initramfs
    # configures it (avm.net), so systemd-networkd would only repeat the work: about 4 s of a TCG boot
    cmdline = (
        f"{request.image.cmdline} quiet tsc_early_khz={tsc_khz} panic=-1 avm.net=10.0.2.15/24,10.0.2.2 "
        f"{NETWORKD_MASKED} {initramfs.GATE_ARG}"
    )
    cpu = ["-cpu", "host"] if accel == "kvm" else ["-cpu", "max"]
    return [
        QEMU,
        "-name",
        f"{request.marker},process={request.marker}",
        "-M",
        f"{MACHINE},pit=on",
        "-accel",
        accel,
        *cpu,
        "-smp",
        str(request.spec.vcpus),
        "-m",
        str(request.spec.memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{state / 'serial.log'}",
        "-qmp",
        f"unix:{state / 'qmp.sock'},server=on,wait=off",
        "-pidfile",
        str(state / "qemu.pid"),
        "-kernel",
        str(request.image.kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        *identity.qemu_args(state),
        # a throwaway host key, so sshd starts at once (vm.seed.placeholder_tar); replaced at the gate
        "-fw_cfg",
        f"name={initramfs.PLACEHOLDER_NAME},file={state / PLACEHOLDER}",
        "-drive",
        f"file={state / 'disk.qcow2'},if=none,id=d0,format=qcow2",
        "-device",
        "virtio-blk-device,drive=d0",
        "-netdev",
        # no hostfwd yet: vm.warm adds the SSH forward once the VM's identity is in
        "user,id=n0",
        "-device",
        "virtio-net-device,netdev=n0",
    ]


class QemuBackend:
    name = "qemu"
    host_network = False

    def preflight(self, spec: VmSpec) -> None:
        for tool in (QEMU, QEMU_IMG):
            if shutil.which(tool) is None:
                raise _tool_missing(tool)

    def boot(self, request: BootRequest) -> Booted:
        from controlplane.vm.accel import probe_accel, require_tsc_khz

        setup_t0 = time.monotonic()
        state = request.state_dir
        cache = request.home.cache / "initramfs"
        initrd = initramfs.for_rootfs(request.image.rootfs, cache)
        t0 = time.monotonic()
        accel = probe_accel(request.image.kernel, initramfs.BUSYBOX)
        probe_s = round(time.monotonic() - t0, 3)
        tsc = require_tsc_khz(Path("/proc/cpuinfo").read_text())
        argv = qemu_argv(request, accel=accel, tsc_khz=tsc, initrd=initrd)
        write_atomic(state / PLACEHOLDER, placeholder_tar(request.spec.name), 0o600, durable=False)
        (state / "qemu.argv.json").write_text(json.dumps(argv))
        version = snapshot.qemu_version(QEMU)
        initrd_sha = snapshot.file_sha256(initrd)
        setup_s = time.monotonic() - setup_t0

        def spawn(full: list[str]) -> subprocess.Popen[bytes]:
            with (state / "qemu.log").open("ab") as log:
                proc = subprocess.Popen(  # detached: the VM outlives this command
                    full,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            time.sleep(0.05)
            if proc.poll() is not None:
                raise OperationalError(
                    "vm-boot-failed",
                    f"QEMU exited at once with code {proc.returncode}",
                    hint="see qemu.log in the VM's state dir",
                    details={"log": (state / "qemu.log").read_text(errors="replace")[-800:]},
                )
            return proc

        proc, started = warm.start(
            request,
            argv,
            qemu_version=version,
            initrd_sha256=initrd_sha,
            overlay=lambda backing: _overlay(backing, state / "disk.qcow2"),
            spawn=spawn,
        )
        return Booted(
            pid=proc.pid,
            accelerator=accel,
            ssh_port=request.ssh_port,
            setup_s=setup_s,
            # the port is forwarded only once sshd is up: an accepted connection reaches sshd,
            # which under TCG and load can take seconds to send its banner
            banner_timeout_s=15.0,
            observations={
                "machine": MACHINE,
                "accel_probe_s": probe_s,
                "tsc_early_khz": tsc,
                "initramfs": str(initrd),
                "serial_log": str(state / "serial.log"),
                "warm_start": started,
                "nested_virtualization": "available (-cpu host)"
                if accel == "kvm"
                else "unavailable: TCG does not emulate VMX/SVM",
            },
        )

    def alive(self, record: VmRecord) -> bool:
        return procs.alive(record.pid, record.marker)

    def shutdown(self, record: VmRecord, *, grace_s: float) -> list[Check]:
        pid = record.pid
        if pid is None or not procs.alive(pid, record.marker):
            return [Check("qemu-stopped", True, f"QEMU pid {pid} was already gone (dead VM)")]
        how = "ACPI power-off via QMP"
        if not _qmp_powerdown(Path(record.state_dir) / "qmp.sock"):
            how = "QMP unavailable; SIGTERM"
            procs.signal_pids([pid], signal.SIGTERM)
        clean = procs.wait_gone([pid], record.marker, grace_s)
        if not clean:
            procs.signal_pids([pid], signal.SIGKILL)
            clean = procs.wait_gone([pid], record.marker, 5.0)
            how += f"; no exit within {grace_s:g}s, SIGKILL " + ("worked" if clean else "failed")
        return [Check("qemu-stopped", clean, how)]

    def leftovers(self, record: VmRecord) -> list[Check]:
        by_marker = procs.pids_with_marker(record.marker)
        procs.signal_pids(by_marker, signal.SIGKILL)
        port_free = record.ssh_port is None or procs.wait_not_listening(record.ssh_port, 5.0)
        return [
            Check(
                "qemu-pid-gone",
                not (record.pid and procs.alive(record.pid, record.marker)),
                f"pid {record.pid}",
            ),
            Check("no-process-with-marker", not by_marker, f"marker {record.marker}: {by_marker or 'none'}"),
            Check("ssh-port-released", port_free, f"nothing listens on 127.0.0.1:{record.ssh_port}"),
        ]


def _overlay(backing: Path, overlay: Path) -> None:
    """A fresh qcow2 overlay on ``backing`` (the golden image, or a snapshot's disk)."""
    made = subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if made.returncode != 0:
        raise OperationalError("overlay-failed", f"qemu-img create failed: {made.stderr.strip()[-300:]}")


def _qmp_powerdown(sock_path: Path) -> bool:
    """Ask the guest for an ACPI power-off. False if QMP is not reachable."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(str(sock_path))
            reader = sock.makefile("rb")
            reader.readline()  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": "system_powerdown"}):
                sock.sendall(json.dumps(cmd).encode() + b"\n")
                with contextlib.suppress(OSError):
                    reader.readline()
            return True
    except OSError:
        return False
