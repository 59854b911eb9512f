"""The libvirt domain XML of a golden VM, as a pure function of typed settings.

Same machine as the ``qemu`` backend: a qcow2 overlay on the image, direct kernel boot with the
image's kernel, initrd and cmdline, the per-VM SSH seed as fw_cfg ``opt/avm/seed``, user-mode
networking with SSH forwarded from 127.0.0.1:<port>, the serial console to a file in the state
dir. Details from ``shared/lab/substrate.md`` section 4:

- libvirt 9's ``<interface type='user'>`` cannot forward ports without passt, so the slirp NIC
  goes through ``<qemu:commandline>``; on q35 it needs an explicit PCI address, or start fails
  with "slot 1 function 0 not available for pcie-root-port".
- microvm has no PCI bus: ``define`` fails with "No PCI buses available" unless USB is off
  (``<controller type='usb' model='none'/>``), and libvirt passes no ``pit=on``, so the guest
  needs ``tsc_early_khz`` on its command line to calibrate its clock.
- Nested virtualisation is part of the golden VM's contract, so the CPU element *requires* it:
  under KVM the host CPU is passed through (and its vmx/svm required when the host shows it);
  under TCG, QEMU emulates AMD's svm, so a qemu64 model with ``svm`` required.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
SEED_FW_CFG = "opt/avm/seed"
# q35: a free slot on pcie.0 for the slirp NIC (slot 1 is taken by libvirt's root ports)
Q35_NIC_ADDR = "0x9"

Machine = Literal["q35", "microvm"]
Accel = Literal["kvm", "tcg"]


@dataclasses.dataclass(frozen=True)
class DomainSettings:
    """Everything the domain XML depends on; ``domain_xml`` reads nothing else."""

    name: str  # the libvirt domain name; also the marker teardown looks for in ps
    vcpus: int
    memory_mib: int
    overlay: Path
    kernel: Path
    initrd: Path
    cmdline: str
    seed: Path
    serial_log: Path
    ssh_port: int
    accel: Accel
    machine: Machine = "q35"
    host_virt_flag: Literal["vmx", "svm"] | None = None  # what the host CPU shows (KVM only)
    tsc_khz: int | None = None  # host TSC kHz; microvm guests need it
    uid: int = 0  # qemu runs as this uid:gid with relabel='no' (see domain_xml)
    gid: int = 0


def domain_xml(s: DomainSettings) -> str:
    """The domain XML for ``s``. Pure: no I/O, same settings give the same bytes."""
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.Element("domain", type="kvm" if s.accel == "kvm" else "qemu")
    _text(dom, "name", s.name)
    _text(dom, "memory", str(s.memory_mib), unit="MiB")
    _text(dom, "vcpu", str(s.vcpus), placement="static")
    dom.append(_os(s))
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    dom.append(_cpu(s))
    sysinfo = ET.SubElement(dom, "sysinfo", type="fwcfg")
    ET.SubElement(sysinfo, "entry", name=SEED_FW_CFG, file=str(s.seed))
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _text(dom, event, "destroy")
    dom.append(_devices(s))
    # The overlay's backing file is the shared image: libvirt's dynamic ownership would chown
    # it (lab 4), and the state dir is 0700, so qemu runs as the caller and nothing is relabelled.
    label = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
    _text(label, "label", f"+{s.uid}:+{s.gid}")
    dom.append(_qemu_commandline(s))
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def guest_cmdline(s: DomainSettings) -> str:
    """The image's cmdline, plus ``tsc_early_khz`` on microvm (it has no PIT to calibrate with)."""
    extra = [f"tsc_early_khz={s.tsc_khz}"] if s.machine == "microvm" and s.tsc_khz else []
    return " ".join([s.cmdline, *extra]).strip()


def _os(s: DomainSettings) -> ET.Element:
    os_el = ET.Element("os")
    _text(os_el, "type", "hvm", arch="x86_64", machine=s.machine)
    _text(os_el, "kernel", str(s.kernel))
    _text(os_el, "initrd", str(s.initrd))
    _text(os_el, "cmdline", guest_cmdline(s))
    return os_el


def _cpu(s: DomainSettings) -> ET.Element:
    if s.accel == "kvm":
        cpu = ET.Element("cpu", mode="host-passthrough", check="none")
        if s.host_virt_flag:
            ET.SubElement(cpu, "feature", policy="require", name=s.host_virt_flag)
        return cpu
    cpu = ET.Element("cpu", mode="custom", match="exact", check="none")
    _text(cpu, "model", "qemu64", fallback="forbid")
    ET.SubElement(cpu, "feature", policy="require", name="svm")
    return cpu


def _devices(s: DomainSettings) -> ET.Element:
    devices = ET.Element("devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    ET.SubElement(disk, "source", file=str(s.overlay))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if s.machine == "microvm":
        ET.SubElement(devices, "controller", type="usb", model="none")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(s.serial_log), append="on")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return devices


def _qemu_commandline(s: DomainSettings) -> ET.Element:
    netdev = f"user,id=avmnet0,hostfwd=tcp:127.0.0.1:{s.ssh_port}-:22"
    nic = (
        "virtio-net-device,netdev=avmnet0"
        if s.machine == "microvm"
        else f"virtio-net-pci,netdev=avmnet0,bus=pcie.0,addr={Q35_NIC_ADDR}"
    )
    cmd = ET.Element(f"{{{QEMU_NS}}}commandline")
    for value in ("-netdev", netdev, "-device", nic):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=value)
    return cmd


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    el.text = text
    return el


def host_virt_flag(cpuinfo: str) -> Literal["vmx", "svm"] | None:
    """vmx (Intel) or svm (AMD) if the host CPU flags show it, from /proc/cpuinfo text."""
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    return "vmx" if "vmx" in flags else "svm" if "svm" in flags else None


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
