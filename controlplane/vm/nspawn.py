"""The ``nspawn`` backend: the golden rootfs booted as a container with real systemd and sshd.

``systemd-nspawn -b --volatile=overlay`` boots the read-only image rootfs with a throw-away
overlay, so the image is never written. The container runs in a network namespace avm makes
for it (``controlplane.vm.nspawnnet``: a veth pair and a /30), so SSH goes to the container's
own address on port 22 and two VMs never collide on a port; the Tier-1 egress rules are
installed into that namespace from the host side, where the container's root cannot change
them. systemd-networkd is masked (bind of /dev/null): the addresses are set from outside. Flags and
why (``shared/lab/substrate.md`` 3.4): ``--keep-unit`` because there is no host D-Bus,
``--register=no`` because there is no machined, ``--volatile=overlay`` because without it every
missing ``--bind-ro`` target is left behind as an empty file in the rootfs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from controlplane.errors import OperationalError, UsageError
from controlplane.evidence.step import Check
from controlplane.transport.local import LocalTransport
from controlplane.vm import cgroup, nspawnnet, procs
from controlplane.vm.base import Booted, BootRequest, VmRecord, VmSpec

NSPAWN = "systemd-nspawn"
INOTIFY_LIMIT = Path("/proc/sys/fs/inotify/max_user_instances")
# Above about 10 containers the default inotify limit (128) degrades boots (fleet lab 3.2).
INOTIFY_SAFE_CONTAINERS = 10


def nspawn_argv(request: BootRequest, netns: str) -> list[str]:
    files = request.seed.files
    binds = {
        files["host_key"]: "/etc/ssh/ssh_host_ed25519_key",
        files["host_key_pub"]: "/etc/ssh/ssh_host_ed25519_key.pub",
        files["authorized_keys"]: "/root/.ssh/authorized_keys",
        files["sshd_dropin"]: "/etc/ssh/sshd_config.d/avm.conf",
        files["hostname"]: "/etc/hostname",
        Path("/dev/null"): "/etc/systemd/system/systemd-networkd.service",
    }
    # a container's root is set up by nspawn: remounting it per /etc/fstab can only fail
    masked = ["systemd-remount-fs.service"]
    return [
        NSPAWN,
        "--boot",
        f"--directory={request.image.rootfs}",
        "--register=no",
        "--keep-unit",
        "--volatile=overlay",
        f"--machine=avm-{request.spec.name}",
        f"--hostname={request.seed.hostname}",
        "--console=passive",
        # the marker shows in nspawn's command line: teardown finds it even if the pid is lost
        f"--setenv=AVM_VM_MARKER={request.marker}",
        f"--network-namespace-path=/run/netns/{netns}",
        *(f"--bind-ro={src}:{dst}" for src, dst in binds.items()),
        *(f"--bind-ro=/dev/null:/etc/systemd/system/{unit}" for unit in masked),
    ]


def spawn_nspawn(argv: list[str], log: Path, group: str) -> subprocess.Popen[bytes]:
    """Start ``systemd-nspawn`` detached (own session, own cgroup), output to ``log``.

    Raises ``OperationalError('tool-missing')`` when systemd-nspawn is not installed.
    """
    procs_files = cgroup.procs_files(group)
    with log.open("ab") as out:
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: cgroup.join_in_child(procs_files),
            )
        except FileNotFoundError as exc:
            raise OperationalError(
                "tool-missing",
                f"`{NSPAWN}` is not installed",
                hint="install systemd-container (`make setup` does it as root)",
            ) from exc


class NspawnBackend:
    name = "nspawn"
    host_network = False  # its own namespace (nspawnnet): sshd listens on port 22 there

    def preflight(self, spec: VmSpec) -> None:
        if spec.ssh_port is not None:
            raise UsageError(
                "ssh-port-not-applicable",
                f"--ssh-port {spec.ssh_port} does not apply to the nspawn backend: each nspawn VM has "
                "its own network namespace and address, and sshd listens on port 22 there",
                hint="omit --ssh-port; the inventory entry and `avm vm status` show the VM's address",
                details={"expected": "no --ssh-port", "actual": spec.ssh_port},
            )
        if shutil.which(NSPAWN) is None:
            raise OperationalError(
                "tool-missing",
                f"`{NSPAWN}` is not installed",
                hint="install systemd-container (`make setup` does it as root)",
            )
        if os.geteuid() != 0:
            raise OperationalError(
                "needs-root", "the nspawn backend must run as root", hint="use --backend qemu, or run as root"
            )
        if not cgroup.hierarchies():
            raise OperationalError(
                "no-cgroups",
                "no usable cgroup hierarchy under /sys/fs/cgroup",
                hint="mount cgroup2 (or the v1 name=systemd hierarchy) first",
            )

    def boot(self, request: BootRequest) -> Booted:
        group = request.marker
        log = request.state_dir / "console.log"
        with LocalTransport() as local:
            net = nspawnnet.create(local, request.spec.name, request.marker)
            try:
                cgroup.create(group)
                proc = spawn_nspawn(nspawn_argv(request, net.netns), log, group)
            except BaseException:
                cgroup.remove(group)
                nspawnnet.remove(local, net)
                raise
        return Booted(
            pid=proc.pid,
            accelerator="container",
            ssh_host=net.guest_addr,
            ssh_port=22,
            observations={
                "network": net.to_json(),
                "cgroup": [str(p) for p in cgroup.paths(group)],
                "console_log": str(log),
                "inotify_max_user_instances": _inotify_limit(),
                "inotify_note": (
                    f"above about {INOTIFY_SAFE_CONTAINERS} containers, raise "
                    "fs.inotify.max_user_instances above 128 or boots degrade"
                ),
            },
        )

    def alive(self, record: VmRecord) -> bool:
        return procs.alive(record.pid, record.marker)

    def shutdown(self, record: VmRecord, *, grace_s: float) -> list[Check]:
        checks = []
        pid = record.pid
        if pid is not None and procs.alive(pid, record.marker):
            # SIGTERM to nspawn asks the container's systemd for an orderly poweroff
            procs.signal_pids([pid], signal.SIGTERM)
            clean = procs.wait_gone([pid], record.marker, grace_s)
            how = f"clean poweroff within {grace_s:g}s of SIGTERM"
            if not clean:
                # not a leftover: the forced stop below is what the next checks verify
                procs.signal_pids([pid], signal.SIGKILL)
                gone = procs.wait_gone([pid], record.marker, 5.0)
                how = f"no poweroff within {grace_s:g}s of SIGTERM; SIGKILL " + (
                    "worked" if gone else "failed"
                )
                clean = gone
            checks.append(Check("nspawn-stopped", clean, how))
        else:
            checks.append(Check("nspawn-stopped", True, f"nspawn pid {pid} was already gone (dead VM)"))
        # a dead or killed nspawn leaves its container's processes behind: the cgroup lists them
        left = cgroup.kill_all(record.marker)
        checks.append(
            Check("container-processes-killed", not left, f"left in cgroup: {left}" if left else "")
        )
        return checks

    def leftovers(self, record: VmRecord) -> list[Check]:
        with contextlib.suppress(Exception):
            cgroup.kill_all(record.marker, deadline_s=2.0)
        stuck = cgroup.remove(record.marker)
        by_pid = record.pid is not None and procs.alive(record.pid, record.marker)
        by_marker = procs.pids_with_marker(record.marker)
        mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if record.state_dir in line]
        net = network(record)
        with LocalTransport() as local:
            net_checks = nspawnnet.remove(local, net) if net else []
        return [
            Check("nspawn-pid-gone", not by_pid, f"pid {record.pid}"),
            Check("no-process-with-marker", not by_marker, f"marker {record.marker}: {by_marker or 'none'}"),
            Check("cgroup-removed", not stuck, ", ".join(stuck) or "removed"),
            Check("no-mounts-left", not mounts, "; ".join(mounts) or "none under the state dir"),
            *net_checks,
        ]


def network(record: VmRecord) -> nspawnnet.VmNet | None:
    """The VM's private network, from its record (None for a VM booted before there was one)."""
    data = record.observations.get("network")
    return nspawnnet.VmNet.from_json(data) if isinstance(data, dict) else None


def _inotify_limit() -> int | None:
    try:
        return int(INOTIFY_LIMIT.read_text())
    except (OSError, ValueError):
        return None
