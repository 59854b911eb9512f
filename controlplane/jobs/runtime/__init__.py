"""Tier-2 runtimes: interchangeable backends that boot one job guest and return what it reported.

``qemu`` launches QEMU directly (microvm or q35, KVM when the probe says it works, TCG
otherwise). ``kata`` hands the job to containerd with the Kata shim where Kata is installed.
Both take a ``Launch`` (what to boot) and return an ``Outcome`` (what was observed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from controlplane.errors import UsageError

if TYPE_CHECKING:  # the runtime seam stays light: `avm --help` imports it
    from controlplane.evidence.step import Check

RUNTIMES = ("qemu", "kata")
CONSOLE_LOG_MAX = 4 << 20  # bytes of console kept per run; the rest is counted, not stored


@dataclasses.dataclass(frozen=True)
class Launch:
    """What to boot. ``marker`` is a unique string put on the QEMU command line (found by gc)."""

    job_id: str
    marker: str
    workdir: Path  # the job's private temp dir on the control host
    kernel: Path
    initramfs: Path
    vcpus: int
    memory_mib: int
    timeout_s: float
    net_args: Sequence[str] = ()
    netns: str | None = None
    machine: str = "microvm"
    acpi: bool = True  # the minimal kernel has no ACPI: microvm then lists virtio-mmio devices on the cmdline
    extra_append: str = ""
    stream: Callable[[str], None] | None = None
    image_archive: Path | None = None  # kata: the pinned image as an oci-archive
    image_ref: str = ""
    argv: Sequence[str] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    secret: str = ""  # frames the result (kata frames the exit status containerd reports with it)
    stdio_max: int = 1 << 20  # bytes of stdout (and of stderr) the result may carry
    result_max: int = 1 << 30  # bytes the result port may hold; beyond it the guest is stopped


@dataclasses.dataclass
class Outcome:
    """What the runtime observed. ``result_path`` holds the raw bytes of the result channel."""

    timed_out: bool
    qemu_rc: int | None
    result_path: Path
    console_log: Path
    wall_s: float
    accel: str
    machine: str
    argv: list[str]
    peak_rss_kib: int = 0
    pid: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)  # runtime-side teardown
    console_bytes_seen: int = 0  # the console log keeps at most CONSOLE_LOG_MAX of them
    result_overflow: bool = False  # the guest wrote more than the result cap: it was stopped


class Runtime(Protocol):
    name: str

    def run(self, launch: Launch) -> Outcome: ...

    def leftovers(self, marker: str) -> list[str]: ...


def get_runtime(name: str, **kwargs: object) -> Runtime:
    """Raises ``UsageError('runtime-unknown')`` for anything but qemu and kata."""
    if name == "qemu":
        from controlplane.jobs.runtime.qemu import QemuRuntime

        return QemuRuntime(**kwargs)  # type: ignore[arg-type]
    if name == "kata":
        from controlplane.jobs.runtime.kata import KataRuntime, require

        require()  # before anything is created: say plainly what is missing
        runtime: Runtime = KataRuntime()
        return runtime
    raise UsageError(
        "runtime-unknown",
        f"unknown Tier-2 runtime {name!r}",
        hint=f"choose one of {', '.join(RUNTIMES)}",
        details={"expected": list(RUNTIMES), "actual": name},
    )
