"""Golden-VM backend names: a leaf module the CLI can import without pydantic (`avm --help` stays fast)."""

from __future__ import annotations

# name -> "module:attribute" of a zero-argument factory returning a ``Backend``
BACKENDS: dict[str, str] = {
    "qemu": "controlplane.vm.qemu:QemuBackend",
    "nspawn": "controlplane.vm.nspawn:NspawnBackend",
    "libvirt": "controlplane.vm.libvirt:LibvirtBackend",
    "gcp": "controlplane.vm.gcp:GcpBackend",
}
DEFAULT_BACKEND = "qemu"
