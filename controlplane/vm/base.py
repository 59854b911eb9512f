"""The golden-VM backend interface: what a backend does, and the models it speaks in.

A backend (``qemu``, ``nspawn``, ``libvirt``, ``gcp``) only knows how to start, probe and stop
one machine. Everything shared — name and port checks, per-VM SSH keys, pinning the host key in
the inventory before the first connection, waiting for SSH, receipts, verified teardown — lives
in ``controlplane.vm.lifecycle`` and is the same for every backend.

Lifecycle of one ``avm vm up`` as a backend sees it::

    backend.preflight(spec)          # tools present, options valid; nothing started yet
    booted = backend.boot(request)   # start the machine detached; return pid/marker/ssh endpoint
    ... lifecycle pins the key, waits for the SSH banner and a real login ...
    backend.alive(record)            # cheap liveness (status)
    backend.shutdown(record, grace_s=...)   # graceful, then forced; returns the checks it made
    backend.leftovers(record)        # checks that nothing of the VM is left (processes, cgroups, ...)

Backends register themselves by name in ``BACKENDS`` (module path, loaded lazily so that
``avm --help`` never imports libvirt or pulumi). This module imports no heavy dependency.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import Field

from controlplane._internal.loading import Frozen
from controlplane.errors import UsageError
from controlplane.evidence.step import Check
from controlplane.home import Home
from controlplane.ids import VmName
from controlplane.vm.names import BACKENDS, DEFAULT_BACKEND


class VmSpec(Frozen):
    """What the user asked for. Validated at the edge: an invalid spec cannot exist."""

    name: VmName
    backend: str = DEFAULT_BACKEND
    vcpus: int = Field(default=2, ge=1, le=64)
    memory_mib: int = Field(default=1024, ge=256, le=262144)
    ssh_port: int | None = Field(default=None, ge=1024, le=65535)  # None: pick a free one
    wait: bool = True
    timeout_s: float = Field(default=300.0, gt=0, le=3600)
    # qemu: boot cold even when a booted snapshot exists, and make none (other backends are always cold)
    cold: bool = False


class VmStatus(enum.StrEnum):
    RUNNING = "running"  # its process is alive
    DEAD = "dead"  # it was never shut down, but its process is gone (crash, kill -9)
    STOPPED = "stopped"  # shut down with `down --keep`: disk and state kept, no process


class VmRecord(Frozen):
    """The runtime facts of one VM, written to ``run/vms/<name>/vm.json`` and the inventory meta.

    ``marker`` is a string unique to this VM that appears in its host process's command line,
    so teardown can prove no process of it is left even when the pid was reused or lost.
    """

    name: VmName
    backend: str
    state_dir: str
    marker: str
    pid: int | None = None
    accelerator: str | None = None  # kvm | tcg | container | cloud
    ssh_host: str = "127.0.0.1"
    ssh_port: int | None = None
    ssh_user: str = "root"
    vcpus: int
    memory_mib: int
    image_digest: str
    host_key: str  # the pinned OpenSSH public key line
    host_key_fingerprint: str  # SHA256:... as ssh-keygen -l prints it
    started_at: float  # wall clock (time.time())
    stopped_at: float | None = None
    observations: dict[str, Any] = Field(default_factory=dict)  # machine type, cpu model, probe


class VmState(Frozen):
    """What `avm vm status` reports for one VM (re-derived from the host, never trusted)."""

    name: str
    backend: str
    status: VmStatus
    pid: int | None
    accelerator: str | None
    ssh_host: str = "127.0.0.1"
    ssh_port: int | None
    uptime_s: float | None
    image_digest: str
    state_dir: str
    detail: str = ""


class GoldenImageLike(Protocol):
    """The fields of ``controlplane.image.golden.GoldenImage`` that backends use."""

    @property
    def digest(self) -> str: ...
    @property
    def rootfs(self) -> Path: ...
    @property
    def qcow2(self) -> Path: ...
    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...
    @property
    def cmdline(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class SshSeed:
    """The per-VM SSH identity a backend must put into the guest before sshd starts.

    ``host_key_private`` is secret: write it only into the VM's state dir (0600) or the guest,
    never into a log or receipt. ``sshd_dropin`` is the text of ``sshd_config.d/avm.conf``.
    """

    hostname: str
    host_key_private: bytes  # OpenSSH PEM, ed25519
    host_key_public: str  # "ssh-ed25519 AAAA... avm-<name>"
    authorized_keys: str  # the client public key line
    sshd_dropin: str
    files: dict[str, Path]  # the same material as files in the state dir (key -> path)

    def tar(self) -> bytes:
        """The seed as a tar (``etc/ssh/...``, ``root/.ssh/authorized_keys``, ``etc/hostname``)."""
        from controlplane.vm.seed import seed_tar

        return seed_tar(self)


@dataclasses.dataclass(frozen=True)
class BootRequest:
    """Everything a backend needs to start one VM. ``state_dir`` exists and is private (0700)."""

    home: Home
    spec: VmSpec
    image: GoldenImageLike
    state_dir: Path
    ssh_port: int
    seed: SshSeed
    marker: str
    # host work that needs no VM, done while the VM's process starts (qemu: while QEMU loads a
    # snapshot); the lifecycle loads its SSH client here, so the first login starts at once
    meanwhile: Callable[[], None] = lambda: None


class Booted(Frozen):
    """What a backend started. The lifecycle turns it into a ``VmRecord``."""

    pid: int | None
    accelerator: str
    ssh_host: str = "127.0.0.1"
    ssh_port: int
    ssh_user: str = "root"
    # seconds spent before the VM's process started (overlay, initramfs, accelerator probe)
    setup_s: float = 0.0
    # how long one login attempt waits for the SSH banner: short where a port forward accepts
    # before sshd is up (each attempt that gives up makes the guest's sshd re-exec once more)
    banner_timeout_s: float = 1.5
    observations: dict[str, Any] = Field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """One kind of golden VM. Implementations keep no state between calls: all they know
    about a VM is in its ``VmRecord`` and its state dir."""

    name: str
    # True when the VM shares the host's network namespace (nspawn): sshd itself must then
    # listen on 127.0.0.1:<ssh_port>. False when the host forwards ssh_port to the guest's 22.
    host_network: bool

    def preflight(self, spec: VmSpec) -> None:
        """Refuse before anything starts: ``UsageError`` for bad options, ``OperationalError``
        (``tool-missing``) when a needed tool or service is absent."""
        ...

    def boot(self, request: BootRequest) -> Booted:
        """Start the VM detached (it must outlive the calling process) and return at once,
        without waiting for SSH. On failure, leave nothing running and raise
        ``OperationalError`` with the tail of the VM's log in ``details``."""
        ...

    def alive(self, record: VmRecord) -> bool:
        """Whether the VM's process (or cloud instance) is running. Never raises for a dead VM."""
        ...

    def shutdown(self, record: VmRecord, *, grace_s: float) -> list[Check]:
        """Stop the VM: graceful first (ACPI / SIGTERM / API) for up to ``grace_s``, then forced.
        Idempotent: a dead VM returns checks saying so. Raises only if it cannot stop it."""
        ...

    def leftovers(self, record: VmRecord) -> list[Check]:
        """Verify nothing of the VM is left that the backend owns (processes by pid and by
        ``marker``, cgroups, domains, instances). Removes what it safely can first."""
        ...


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``.

    Raises ``UsageError('unknown-backend')`` for a name not in ``BACKENDS``, and
    ``OperationalError('backend-unavailable')`` when its module cannot be imported (e.g. the
    optional libvirt or gcp extra is not installed).
    """
    from controlplane.errors import OperationalError

    ref = BACKENDS.get(name)
    if ref is None:
        raise UsageError(
            "unknown-backend",
            f"unknown VM backend {name!r}",
            hint=f"choose one of: {', '.join(BACKENDS)}",
            details={"expected": list(BACKENDS), "actual": name},
        )
    module_name, attr = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OperationalError(
            "backend-unavailable",
            f"the {name} backend cannot be loaded: {exc}",
            hint=f"install the extra it needs (pip install 'agent-vm[{name}]') or pick another backend",
            details={"backend": name},
        ) from exc
    factory = getattr(module, attr)
    backend: Backend = factory()
    return backend
