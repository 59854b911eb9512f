"""The ``libvirt`` backend: the golden VM as a libvirt domain, driven through libvirt-python.

The domain XML comes from ``controlplane.vm.domainxml`` (a pure function); the initrd is the
qemu backend's seed-installing initramfs, so both backends boot the same guest. The domain's name is
the VM's marker, so it shows in qemu's ``-name guest=...`` and teardown can prove no process is
left even when libvirtd lost track. ``libvirt`` (optional extra ``agent-vm[libvirt]``) is
imported only inside these functions. The connection URI is ``$AVM_LIBVIRT_URI``, else
``qemu:///system`` as root and ``qemu:///session`` otherwise; ``$AVM_LIBVIRT_MACHINE`` picks
``q35`` (default) or ``microvm``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from controlplane.errors import OperationalError
from controlplane.evidence.step import Check
from controlplane.transport.local import LocalTransport
from controlplane.vm import domainxml, initramfs, procs
from controlplane.vm.accel import host_tsc_khz
from controlplane.vm.base import Booted, BootRequest, VmRecord, VmSpec

URI_ENV = "AVM_LIBVIRT_URI"
MACHINE_ENV = "AVM_LIBVIRT_MACHINE"
START_HINT = (
    "start the daemons (`systemctl start libvirtd`, or `virtlogd -d; libvirtd -d` without systemd; "
    "Debian: apt-get install libvirt-daemon-system), or set AVM_LIBVIRT_URI, or use --backend qemu"
)


def default_uri() -> str:
    return os.environ.get(URI_ENV) or ("qemu:///system" if os.geteuid() == 0 else "qemu:///session")


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise OperationalError(
            "libvirt-python-missing",
            "the libvirt backend needs libvirt-python, which is not installed",
            hint="pip install 'agent-vm[libvirt]' (builds against libvirt-dev and pkg-config)",
        ) from exc
    # libvirt prints every error to stderr by default; ours are raised, not printed
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


@contextlib.contextmanager
def connect(uri: str) -> Iterator[Any]:
    """An open libvirt connection. Raises ``OperationalError('libvirtd-unreachable')``."""
    libvirt = _libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise OperationalError(
            "libvirtd-unreachable",
            f"cannot connect to libvirt at {uri}: {exc}",
            hint=START_HINT,
            details={"uri": uri},
        ) from exc
    try:
        yield conn
    finally:
        conn.close()


def _lookup(conn: Any, name: str) -> Any | None:
    libvirt = _libvirt()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


class LibvirtBackend:
    name = "libvirt"
    host_network = False

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or default_uri()

    def preflight(self, spec: VmSpec) -> None:
        with connect(self.uri):
            pass
        if shutil.which("qemu-img") is None:
            raise OperationalError(
                "tool-missing", "`qemu-img` is not installed", hint="install qemu-utils (`make setup`)"
            )
        machine = os.environ.get(MACHINE_ENV, "q35")
        if machine not in ("q35", "microvm"):
            raise OperationalError(
                "bad-machine",
                f"{MACHINE_ENV}={machine!r} is not a machine type avm knows",
                hint="use q35 or microvm",
                details={"expected": ["q35", "microvm"], "actual": machine},
            )

    def settings(self, request: BootRequest) -> domainxml.DomainSettings:
        cpuinfo = domainxml.read_cpuinfo()
        # the qemu backend's probe (cached, AVM_ACCEL overrides): /dev/kvm can exist and still
        # fail to run a guest (nested KVM), and libvirt would only say so at start
        from controlplane.vm.accel import probe_accel

        probed = probe_accel(request.image.kernel, initramfs.BUSYBOX)
        accel: domainxml.Accel = "kvm" if probed == "kvm" else "tcg"
        machine = cast(domainxml.Machine, os.environ.get(MACHINE_ENV, "q35"))
        state = request.state_dir
        return domainxml.DomainSettings(
            name=request.marker,
            vcpus=request.spec.vcpus,
            memory_mib=request.spec.memory_mib,
            overlay=state / "overlay.qcow2",
            kernel=request.image.kernel,
            initrd=seed_initrd(request),
            cmdline=request.image.cmdline,
            seed=state / "seed.tar",
            serial_log=state / "serial.log",
            ssh_port=request.ssh_port,
            accel=accel,
            machine=machine,
            host_virt_flag=domainxml.host_virt_flag(cpuinfo) if accel == "kvm" else None,
            tsc_khz=host_tsc_khz(cpuinfo),
            uid=os.getuid(),
            gid=os.getgid(),
        )

    def boot(self, request: BootRequest) -> Booted:
        """Create the overlay and seed, define and start the domain. On failure the domain is
        destroyed and undefined; raises ``OperationalError('vm-boot-failed')``."""
        s = self.settings(request)
        base = str(request.image.qcow2)
        overlay = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, str(s.overlay)]
        with LocalTransport() as local:
            local.run(overlay, timeout=60).check()
        s.seed.touch(mode=0o600)
        s.seed.write_bytes(request.seed.tar())
        xml = domainxml.domain_xml(s)
        (request.state_dir / "domain.xml").write_text(xml)
        libvirt = _libvirt()
        with connect(self.uri) as conn:
            try:
                dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
                dom.create()
            except libvirt.libvirtError as exc:
                self._remove(conn, s.name)
                raise OperationalError(
                    "vm-boot-failed",
                    f"libvirt refused to start {s.name}: {exc}",
                    hint=f"see {request.state_dir / 'domain.xml'} and the libvirtd log",
                ) from exc
            uuid = dom.UUIDString()
        return Booted(
            pid=_qemu_pid(s.name),
            accelerator=s.accel,
            ssh_port=request.ssh_port,
            observations={"uri": self.uri, "domain": s.name, "uuid": uuid, "machine": s.machine},
        )

    def alive(self, record: VmRecord) -> bool:
        try:
            with connect(self.uri) as conn:
                dom = _lookup(conn, record.marker)
                return bool(dom is not None and dom.isActive())
        except OperationalError:
            return bool(procs.pids_with_marker(record.marker))

    def shutdown(self, record: VmRecord, *, grace_s: float) -> list[Check]:
        with connect(self.uri) as conn:
            dom = _lookup(conn, record.marker)
            if dom is None or not dom.isActive():
                return [Check("domain-stopped", True, "the domain was not running")]
            with contextlib.suppress(Exception):
                dom.shutdown()  # ACPI power button
            deadline = time.monotonic() + grace_s
            while dom.isActive() and time.monotonic() < deadline:
                time.sleep(0.2)
            how = f"clean ACPI shutdown within {grace_s:g}s"
            if dom.isActive():
                dom.destroy()
                how = f"no ACPI shutdown within {grace_s:g}s; destroyed"
            return [Check("domain-stopped", not dom.isActive(), how)]

    def leftovers(self, record: VmRecord) -> list[Check]:
        with connect(self.uri) as conn:
            self._remove(conn, record.marker)
            gone = _lookup(conn, record.marker) is None
        by_marker = procs.pids_with_marker(record.marker)
        return [
            Check("domain-undefined", gone, f"{record.marker} on {self.uri}"),
            Check("no-process-with-marker", not by_marker, f"marker {record.marker}: {by_marker or 'none'}"),
        ]

    def _remove(self, conn: Any, name: str) -> None:
        dom = _lookup(conn, name)
        if dom is None:
            return
        with contextlib.suppress(Exception):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(Exception):
            dom.undefine()


def seed_initrd(request: BootRequest) -> Path:
    """The qemu backend's busybox initramfs (``vm.initramfs``): the image's own initrd knows
    nothing of the fw_cfg seed, so without this the guest would have no SSH keys.
    Raises ``OperationalError`` (``image-incomplete``, ``tool-missing``)."""
    return initramfs.for_rootfs(request.image.rootfs, request.home.cache / "initramfs")


def _qemu_pid(name: str) -> int | None:
    """libvirt's qemu pid file (system or session daemon); None for drivers without a process."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "/nonexistent")
    for path in (Path(f"/run/libvirt/qemu/{name}.pid"), Path(runtime) / f"libvirt/qemu/run/{name}.pid"):
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
    return None
