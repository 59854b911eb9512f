"""What every golden-VM backend shares: up, down, status and ssh, each with its evidence.

``up``: validate -> preflight -> per-VM keys -> pin the host key in the inventory -> boot ->
wait for the SSH banner and a real login -> receipt. ``down``: graceful stop -> forced stop ->
verify nothing is left (processes, cgroups, mounts, state dir, inventory entry) -> receipt.
A VM's runtime record lives in ``run/vms/<name>/vm.json``; status is re-derived from /proc.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane._internal.progress import Progress, quiet
from controlplane.errors import AvmError, OperationalError, RefusedError
from controlplane.evidence import step as evidence
from controlplane.evidence.step import Check
from controlplane.home import Home
from controlplane.transport import inventory
from controlplane.transport.base import RunResult
from controlplane.transport.ssh import preload as preload_ssh
from controlplane.vm import procs
from controlplane.vm.base import (
    Backend,
    BootRequest,
    GoldenImageLike,
    VmRecord,
    VmSpec,
    VmState,
    VmStatus,
    get_backend,
)
from controlplane.vm.seed import fingerprint, make_seed


def vms_dir(home: Home) -> Path:
    return home.run / "vms"


def state_dir(home: Home, name: str) -> Path:
    return vms_dir(home) / name


def load_record(home: Home, name: str) -> VmRecord:
    """Raises ``OperationalError('vm-not-found')`` when no VM of that name exists."""
    path = state_dir(home, name) / "vm.json"
    try:
        return VmRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise OperationalError(
            "vm-not-found",
            f"no VM named {name!r} in {vms_dir(home)}",
            hint="`avm vm status` lists the VMs; `avm vm up NAME` creates one",
        ) from exc


def _save_record(record: VmRecord) -> None:
    write_atomic(Path(record.state_dir) / "vm.json", record.model_dump_json(indent=2).encode())


def _log_tail(state: Path, lines: int = 25) -> str:
    for name in ("console.log", "serial.log"):
        with contextlib.suppress(OSError):
            return "\n".join((state / name).read_text(errors="replace").splitlines()[-lines:])
    return ""


def up(home: Home, spec: VmSpec, image: GoldenImageLike, *, progress: Progress = quiet) -> VmRecord:
    """Boot a VM and wait until a real SSH login works. Writes a ``vm-up`` receipt.

    Raises ``RefusedError('vm-exists')`` if the name is taken, ``UsageError('port-taken')`` for a
    busy --ssh-port, the backend's preflight errors, and ``OperationalError('vm-boot-failed')``
    (with the console tail) when SSH does not come up in time; a failed boot leaves nothing.
    """
    state = state_dir(home, spec.name)
    if state.exists():
        raise RefusedError(
            "vm-exists",
            f"a VM named {spec.name!r} already exists",
            hint=f"`avm vm status {spec.name}` shows it; `avm vm down {spec.name}` removes it",
        )
    backend = get_backend(spec.backend)
    backend.preflight(spec)
    if spec.ssh_port is not None:
        procs.require_port_free(spec.ssh_port)
    port = spec.ssh_port or procs.free_port()
    inputs = {
        "name": spec.name,
        "backend": spec.backend,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "cold": spec.cold,
    }
    with evidence.record_step(home, "vm-up", inputs=inputs) as step:
        step.subject(f"image:{spec.name}", image.digest)
        vms_dir(home).mkdir(mode=0o700, parents=True, exist_ok=True)
        state.mkdir(mode=0o700)
        marker = f"avm-vm-{spec.name}-{secrets.token_hex(6)}"
        listen = "127.0.0.1" if backend.host_network else None
        seed = make_seed(state, spec.name, port=port if backend.host_network else None, listen=listen)
        # pinned before the first connection: there is no trust-on-first-use moment
        target = inventory.Target(
            name=spec.name,
            url=f"ssh://root@127.0.0.1:{port}",
            host_key=seed.host_key_public,
            identity=str(seed.files["client_key"]),
            backend=spec.backend,
        )
        inventory.save(home, target)
        step.observe("host_key_fingerprint", fingerprint(seed.host_key_public))
        request = BootRequest(
            home=home,
            spec=spec,
            image=image,
            state_dir=state,
            ssh_port=port,
            seed=seed,
            marker=marker,
            meanwhile=preload_ssh,
        )
        t0 = time.monotonic()
        progress(f"booting {spec.name} ({spec.backend}, {spec.vcpus} vCPU, {spec.memory_mib} MiB)")
        try:
            booted = backend.boot(request)
            record = VmRecord(
                name=spec.name,
                backend=spec.backend,
                state_dir=str(state),
                marker=marker,
                pid=booted.pid,
                accelerator=booted.accelerator,
                ssh_host=booted.ssh_host,
                ssh_port=booted.ssh_port,
                ssh_user=booted.ssh_user,
                vcpus=spec.vcpus,
                memory_mib=spec.memory_mib,
                image_digest=image.digest,
                host_key=seed.host_key_public,
                host_key_fingerprint=fingerprint(seed.host_key_public),
                started_at=time.time(),
                observations=booted.observations,
            )
            _save_record(record)
            if (booted.ssh_host, booted.ssh_port) != ("127.0.0.1", port):
                # the backend gave the VM its own address (nspawn's private netns): the entry
                # moves there, with the same pinned key, still before the first connection
                target = target.model_copy(
                    update={
                        "url": f"ssh://{booted.ssh_user}@{booted.ssh_host}:{booted.ssh_port}",
                        "meta": {"network": booted.observations.get("network")},
                    }
                )
                inventory.save(home, target)
            step.observe("accelerator", booted.accelerator)
            observed = dict(booted.observations)
            warm_start = observed.pop("warm_start", None)
            step.observe("backend", observed)
            if warm_start is not None:  # qemu: restored or cold, the snapshot's key, inputs, sha256s
                step.observe("warm_start", warm_start)
                step.result["start_path"] = warm_start["path"]
            if spec.wait:
                _wait_for_login(home, record, backend, spec.timeout_s, t0, progress, booted.banner_timeout_s)
                total = time.monotonic() - t0
                # from the VM's process start to a working login; setup before it is reported apart
                step.result["boot_to_ssh_s"] = round(total - booted.setup_s, 3)
                step.result["setup_s"] = round(booted.setup_s, 3)
                step.result["up_total_s"] = round(total, 3)
                progress(
                    f"{spec.name}: SSH login works {step.result['boot_to_ssh_s']:.1f}s after boot "
                    f"(+{booted.setup_s:.1f}s setup)"
                )
            else:
                step.non_claim("--no-wait: SSH readiness was not checked")
        except BaseException as exc:
            tail = _log_tail(state)
            _abort(home, spec.name, state, backend, marker)
            if isinstance(exc, AvmError):
                exc.details.setdefault("console_tail", tail)
            raise
        step.result.update(
            {
                "ssh_host": booted.ssh_host,
                "ssh_port": booted.ssh_port,
                "pid": booted.pid,
                "state_dir": str(state),
            }
        )
    return record


def _wait_for_login(
    home: Home,
    record: VmRecord,
    backend: Backend,
    timeout_s: float,
    t0: float,
    progress: Progress,
    banner_timeout_s: float = 1.5,
) -> None:
    import logging

    from controlplane.transport.ssh import SshTransport

    # while the guest boots, paramiko logs a traceback for every refused banner: not news
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)

    deadline = t0 + timeout_s
    last_note = 0.0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OperationalError(
                "vm-boot-failed",
                f"{record.name}: no SSH login within {timeout_s:g}s",
                hint="see the console tail below, and the log in the VM's state dir",
                details={"expected": "an SSH login", "actual": "timed out"},
            )
        if not backend.alive(record):
            raise OperationalError(
                "vm-boot-failed",
                f"{record.name}: the VM's process exited during boot",
                hint="see the console tail",
            )
        try:
            # straight to a real login: a separate banner probe would make the guest's sshd
            # fork and re-exec once more (about a second of TCG time) before the login it waits for
            target = inventory.load(home, record.name)
            with SshTransport.from_target(target, connect_timeout=5, banner_timeout=banner_timeout_s) as ssh:
                ssh.login_check(timeout=10)
            return
        except OperationalError:
            if time.monotonic() - last_note > 5:
                progress(f"  waiting for SSH ... {time.monotonic() - t0:.0f}s")
                last_note = time.monotonic()
            time.sleep(0.1)


def _abort(home: Home, name: str, state: Path, backend: Backend, marker: str) -> None:
    """Best-effort cleanup after a failed boot: nothing of the attempt may stay behind."""
    with contextlib.suppress(Exception):
        record = load_record(home, name)
        backend.shutdown(record, grace_s=2.0)
        backend.leftovers(record)
    procs.signal_pids(procs.pids_with_marker(marker), signal.SIGKILL)
    shutil.rmtree(state, ignore_errors=True)
    with contextlib.suppress(Exception):
        inventory.remove(home, name)


def down(home: Home, name: str, *, grace_s: float = 10.0, progress: Progress = quiet) -> list[Check]:
    """Stop a VM and verify nothing is left. Writes a ``vm-down`` receipt.

    Raises ``OperationalError('vm-not-found')`` and ``OperationalError('teardown-incomplete')``
    (receipt status failed, with every check) when anything of the VM remains.
    """
    record = load_record(home, name)
    backend = get_backend(record.backend)
    with evidence.record_step(home, "vm-down", inputs={"name": name, "backend": record.backend}) as step:
        step.subject(f"image:{name}", record.image_digest)
        was_alive = backend.alive(record)
        step.observe("status_before", "running" if was_alive else "dead")
        progress(f"stopping {name} ({'running' if was_alive else 'dead'})")
        t0 = time.monotonic()
        checks = backend.shutdown(record, grace_s=grace_s)
        checks += backend.leftovers(record)
        shutil.rmtree(record.state_dir, ignore_errors=True)
        checks.append(Check("state-dir-removed", not Path(record.state_dir).exists(), record.state_dir))
        inventory.remove(home, name)
        checks.append(Check("inventory-entry-removed", not (home.inventory / f"{name}.json").exists()))
        for check in checks:
            step.check(check.name, ok=check.ok, detail=check.detail)
        step.result["teardown_s"] = round(time.monotonic() - t0, 3)
        failed = [c for c in checks if not c.ok]
        if failed:
            raise OperationalError(
                "teardown-incomplete",
                f"{name}: {len(failed)} teardown check(s) failed: {', '.join(c.name for c in failed)}",
                hint="see `avm receipts show` for the details; remove what is listed by hand",
                details={"failed": [c._asdict() for c in failed]},
            )
    return checks


def status(home: Home, name: str | None = None) -> list[VmState]:
    """Every VM's state (or one), re-derived from the host. Never trusts the record's claims."""
    records = (
        [load_record(home, name)]
        if name
        else [VmRecord.model_validate_json(p.read_bytes()) for p in sorted(vms_dir(home).glob("*/vm.json"))]
    )
    states = []
    for record in records:
        backend = get_backend(record.backend)
        running = backend.alive(record)
        states.append(
            VmState(
                name=record.name,
                backend=record.backend,
                status=VmStatus.RUNNING if running else VmStatus.DEAD,
                pid=record.pid,
                accelerator=record.accelerator,
                ssh_host=record.ssh_host,
                ssh_port=record.ssh_port,
                uptime_s=round(time.time() - record.started_at, 1) if running else None,
                image_digest=record.image_digest,
                state_dir=record.state_dir,
                detail="" if running else "its process is gone; `avm vm down` cleans up",
            )
        )
    return states


def ssh(home: Home, name: str, argv: Sequence[str], *, timeout: float = 120.0) -> RunResult:
    """Run argv in the VM over the pinned SSH connection."""
    from controlplane.transport.ssh import SshTransport

    load_record(home, name)
    with SshTransport.from_target(inventory.load(home, name)) as transport:
        return transport.run(list(argv), timeout=timeout)
