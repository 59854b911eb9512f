"""libvirt backend: the domain XML's properties, libvirt's schema accepting it, the API flow on
libvirt's in-library ``test:///default`` driver, and the refusal when no libvirtd runs.

What this does NOT prove: that a golden VM boots under libvirt. ``test:///default`` is a mock
hypervisor inside libvirt itself: it parses and validates the XML and tracks domain state, but
starts no qemu. Booting under ``qemu:///system`` (a running libvirtd) is tests/test_gateway_libvirt.py.
"""

from __future__ import annotations

import dataclasses
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from controlplane.errors import OperationalError
from controlplane.home import Home
from controlplane.vm import domainxml, lifecycle
from controlplane.vm.accel import host_tsc_khz
from controlplane.vm.base import BootRequest, VmRecord, VmSpec
from controlplane.vm.domainxml import QEMU_NS, DomainSettings, domain_xml
from controlplane.vm.seed import make_seed

needs_libvirt = pytest.mark.usefixtures("libvirt_extra")


def settings(tmp: Path, **over: object) -> DomainSettings:
    base = DomainSettings(
        name="avm-vm-t1-0123456789ab",
        vcpus=2,
        memory_mib=1024,
        overlay=tmp / "overlay.qcow2",
        kernel=tmp / "vmlinuz",
        initrd=tmp / "initrd.img",
        cmdline="root=/dev/vda rw console=ttyS0",
        seed=tmp / "seed.tar",
        serial_log=tmp / "serial.log",
        ssh_port=22206,
        accel="tcg",
    )
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def parse(s: DomainSettings) -> ET.Element:
    return ET.fromstring(domain_xml(s))  # noqa: S314 - our own output, not untrusted input


def qemu_args(dom: ET.Element) -> list[str]:
    return [a.attrib["value"] for a in dom.iter(f"{{{QEMU_NS}}}arg")]


@pytest.mark.parametrize(
    ("accel", "flag", "dom_type", "cpu_mode", "required"),
    [
        ("kvm", "vmx", "kvm", "host-passthrough", ["vmx"]),
        ("kvm", "svm", "kvm", "host-passthrough", ["svm"]),
        ("kvm", None, "kvm", "host-passthrough", []),  # host shows no flag: passthrough is all there is
        ("tcg", None, "qemu", "custom", ["svm"]),  # no KVM: TCG emulates AMD svm
    ],
)
def test_cpu_element_carries_nested_virt(
    tmp_path: Path, accel: str, flag: str | None, dom_type: str, cpu_mode: str, required: list[str]
) -> None:
    dom = parse(settings(tmp_path, accel=accel, host_virt_flag=flag))
    cpu = dom.find("cpu")
    assert dom.attrib["type"] == dom_type
    assert cpu is not None and cpu.attrib["mode"] == cpu_mode
    assert [f.attrib["name"] for f in cpu.iter("feature") if f.attrib["policy"] == "require"] == required


@pytest.mark.parametrize("machine", ["q35", "microvm"])
def test_machine_specific_details(tmp_path: Path, machine: str) -> None:
    dom = parse(settings(tmp_path, machine=machine, tsc_khz=2_450_000))
    usb_off = [c for c in dom.iter("controller") if c.attrib == {"type": "usb", "model": "none"}]
    cmdline = dom.findtext("os/cmdline") or ""
    nic = qemu_args(dom)[3]
    if machine == "microvm":
        # without it: "XML error: No PCI buses available"; without pit=on the clock needs tsc_early_khz
        assert usb_off and "tsc_early_khz=2450000" in cmdline.split()
        assert nic.startswith("virtio-net-device,")
    else:
        assert not usb_off and "tsc_early_khz" not in cmdline
        assert "bus=pcie.0,addr=0x9" in nic  # without an address libvirt's root port collides
    assert dom.find("os/type") is not None and dom.find("os/type").attrib["machine"] == machine  # type: ignore[union-attr]


def test_same_machine_as_the_qemu_backend(tmp_path: Path) -> None:
    s = settings(tmp_path)
    dom = parse(s)
    assert dom.findtext("memory") == "1024" and dom.find("memory").attrib["unit"] == "MiB"  # type: ignore[union-attr]
    assert dom.findtext("vcpu") == "2"
    assert dom.findtext("os/kernel") == str(s.kernel) and dom.findtext("os/initrd") == str(s.initrd)
    assert dom.findtext("os/cmdline") == s.cmdline
    disk = dom.find("devices/disk")
    assert disk is not None
    assert disk.find("driver").attrib["type"] == "qcow2"  # type: ignore[union-attr]
    assert disk.find("source").attrib["file"] == str(s.overlay)  # type: ignore[union-attr]
    entry = dom.find("sysinfo[@type='fwcfg']/entry")
    assert entry is not None and entry.attrib == {"name": "opt/avm/seed", "file": str(s.seed)}
    serial = dom.find("devices/serial/source")
    assert serial is not None and serial.attrib["path"] == str(tmp_path / "serial.log")
    assert "user,id=avmnet0,hostfwd=tcp:127.0.0.1:22206-:22" in qemu_args(dom)
    # the shared backing image must not be chowned by libvirt's dynamic ownership
    label = dom.find("seclabel")
    assert label is not None and label.attrib["relabel"] == "no"


def test_hostile_cmdline_cannot_add_elements(tmp_path: Path) -> None:
    nasty = "console=ttyS0 </cmdline><kernel>/evil</kernel> & 'x'"
    dom = parse(settings(tmp_path, cmdline=nasty))
    assert dom.findtext("os/cmdline") == nasty
    assert [k.text for k in dom.iter("kernel")] == [str(tmp_path / "vmlinuz")]


@pytest.mark.parametrize(
    ("cpuinfo", "flag", "khz"),
    [
        ("cpu MHz\t\t: 2450.000\nflags\t\t: fpu vme svm sse\n", "svm", 2_450_000),
        ("flags\t\t: fpu vmx\ncpu MHz\t\t: 2999.998\n", "vmx", 2_999_998),
        ("flags\t\t: fpu sse\n", None, None),
        ("", None, None),
    ],
)
def test_host_facts_from_cpuinfo(cpuinfo: str, flag: str | None, khz: int | None) -> None:
    assert domainxml.host_virt_flag(cpuinfo) == flag
    assert host_tsc_khz(cpuinfo) == khz


@needs_libvirt
@pytest.mark.parametrize(("accel", "machine"), [("tcg", "q35"), ("tcg", "microvm"), ("kvm", "q35")])
def test_libvirt_schema_accepts_the_domain_xml(tmp_path: Path, accel: str, machine: str) -> None:
    import libvirt

    conn = libvirt.open("test:///default")
    xml = domain_xml(settings(tmp_path, accel=accel, machine=machine, host_virt_flag="vmx", tsc_khz=1))
    dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    dom.undefine()
    # the control: validation is really on, so a schema violation is refused
    with pytest.raises(libvirt.libvirtError, match=r"(?i)schema|valid"):
        bad = xml.replace('<memballoon model="none" />', '<memballoon model="no-such-model" />')
        assert bad != xml
        conn.defineXMLFlags(bad, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    conn.close()


@dataclasses.dataclass(frozen=True)
class FakeImage:
    digest: str
    rootfs: Path
    qcow2: Path
    kernel: Path
    initrd: Path
    cmdline: str


def boot_request(home: Home, tmp: Path, name: str = "lv1") -> BootRequest:
    qcow2 = tmp / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "16M"], check=True)
    image = FakeImage("sha256:" + "0" * 64, tmp, qcow2, tmp / "vmlinuz", tmp / "initrd.img", "console=ttyS0")
    state = tmp / "state"
    state.mkdir(mode=0o700)
    spec = VmSpec(name=name, backend="libvirt")
    seed = make_seed(state, name)
    return BootRequest(home, spec, image, state, 22207, seed, f"avm-vm-{name}-abcdef012345")


@needs_libvirt
def test_libvirt_flow_against_libvirt_test_driver(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the backend's define/start/alive/shutdown/undefine calls and that the generated XML
    passes libvirt's schema validation. Does not boot a VM: the test driver runs no qemu."""
    import libvirt

    from controlplane.vm.libvirt import LibvirtBackend

    # test:///default keeps its domains only while a connection is open in the process: this one
    # plays libvirtd's part, so each backend call (which opens and closes its own) sees the same state
    keeper = libvirt.open("test:///default")
    backend = LibvirtBackend(uri="test:///default")
    request = boot_request(home, tmp_path)
    # the seed initramfs needs a real rootfs (its tests are the qemu backend's); any file will do here
    monkeypatch.setattr("controlplane.vm.libvirt.seed_initrd", lambda _r: tmp_path / "initrd.img")
    monkeypatch.setenv("AVM_ACCEL", "tcg")  # the KVM probe boots the real kernel; there is none here
    booted = backend.boot(request)
    assert keeper.lookupByName(request.marker).isActive()
    assert (request.state_dir / "overlay.qcow2").is_file()
    assert (request.state_dir / "seed.tar").stat().st_mode & 0o777 == 0o600
    assert booted.ssh_port == 22207 and booted.observations["domain"] == request.marker
    record = VmRecord(
        name=request.spec.name,
        backend="libvirt",
        state_dir=str(request.state_dir),
        marker=request.marker,
        vcpus=2,
        memory_mib=1024,
        image_digest=request.image.digest,
        host_key=request.seed.host_key_public,
        host_key_fingerprint="x",
        started_at=0.0,
    )
    assert backend.alive(record)
    assert all(c.ok for c in backend.shutdown(record, grace_s=2.0))
    assert not backend.alive(record)
    checks = backend.leftovers(record)
    assert all(c.ok for c in checks), checks
    assert [c.name for c in checks] == ["domain-undefined", "no-process-with-marker"]
    assert request.marker not in [d.name() for d in keeper.listAllDomains()]
    keeper.close()


@needs_libvirt
def test_up_without_libvirtd_is_a_clear_error_and_creates_nothing(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVM_LIBVIRT_URI", f"qemu+unix:///system?socket={tmp_path}/no-libvirt-sock")
    image = boot_request(home, tmp_path).image
    with pytest.raises(OperationalError) as err:
        lifecycle.up(home, VmSpec(name="lv2", backend="libvirt"), image)
    assert err.value.code == "libvirtd-unreachable"
    assert "libvirtd -d" in err.value.hint
    assert not lifecycle.state_dir(home, "lv2").exists()
    assert not (home.inventory / "lv2.json").exists()
