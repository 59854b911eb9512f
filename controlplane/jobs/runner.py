"""Run one Tier-2 job: verify the pinned, signed image, boot it, collect the result, tear down.

Stages: refuse bad input (spec, inputs, image pin, signature) before anything is created ->
clean stale leftovers of the same id -> claim the output directory -> start the watchdog (it
tears the run down if the runner dies) -> build the guest root (layers + /.avm) -> network
(none, or the egress module's netns) -> boot (runtime) -> the result the init framed for this
run -> outputs streamed to disk -> teardown, verified. One ``job-run`` receipt records every
check, refused runs included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from controlplane.errors import ExitCode, OperationalError, UsageError
from controlplane.evidence import events as auditevents
from controlplane.evidence import step as evidence
from controlplane.evidence.step import Check
from controlplane.governance import controls as governance
from controlplane.home import Home
from controlplane.image import sign as imagesign
from controlplane.jobs import files as jobfiles
from controlplane.jobs import gateway as jobgateway
from controlplane.jobs import guest as guestinit
from controlplane.jobs import result as jobresult
from controlplane.jobs import teardown as jobteardown
from controlplane.jobs import watch as jobwatch
from controlplane.jobs.egress import network as egress
from controlplane.jobs.egress.live import JobNetwork
from controlplane.jobs.oci import store as ocistore
from controlplane.jobs.runtime import CONSOLE_LOG_MAX, Launch, Outcome, Runtime, get_runtime
from controlplane.jobs.spec import JobLimits, JobSpec
from controlplane.transport.base import Transport

RESULT_SLACK = 16 << 20  # tar headers and padding on top of the byte limits
CONSOLE_STREAM_MAX = 1 << 20  # bytes of each of stdout/stderr the guest echoes to its console
MICROVM_MODULES = ("virtio_mmio", "virtio_console")
Q35_MODULES = ("virtio_pci", "virtio_console")
NET_MODULES = ("virtio_net",)
MINIMAL_APPEND = "noapictimer"  # lab: 0.66 s instead of 0.85 s a job with the minimal kernel


@dataclasses.dataclass(frozen=True)
class JobResult:
    job_id: str
    status: str  # ok | failed | timeout
    exit_code: int | None  # the job's own exit code; None when it timed out
    stdout: str
    stderr: str
    outputs: list[str]
    output_dir: Path | None
    wall_s: float
    peak_rss_kib: int
    receipt_id: str | None
    checks: list[Check]
    truncated: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    console_log: Path | None = None

    @property
    def avm_exit_code(self) -> int:
        return int(exit_code_for(self.status))


@dataclasses.dataclass(frozen=True)
class GuestKernelChoice:
    kernel: Path
    digest: str
    modules: list[Path]
    source: str  # golden | minimal
    acpi: bool = True
    append: str = ""


def pick_kernel(home: Home, which: str, machine: str, net: bool) -> GuestKernelChoice:
    """The golden image's kernel (virtio modules loaded from its rootfs) or the cached minimal one.

    Raises ``OperationalError('image-not-built' | 'guest-kernel-not-built')``."""
    from controlplane.image.current import recipe_image

    if which == "minimal":
        from controlplane.jobs import kernel as guestkernel

        if machine != "microvm":
            raise UsageError(
                "guest-kernel-machine",
                f"the minimal guest kernel boots only on microvm, not {machine} (it has no PCI or ACPI)",
                hint="use --machine microvm, or --guest-kernel golden",
                details={"expected": "microvm", "actual": machine},
            )
        k = guestkernel.cached(home.cache / "guest-kernel") or guestkernel.cached(
            Path("/var/tmp/avm-guest-kernel")
        )
        if k is None:
            raise OperationalError(
                "guest-kernel-not-built",
                "no minimal guest kernel is built for the current config",
                hint="build it: python -m controlplane.jobs.kernel <home>/cache/guest-kernel (about 3 min)",
            )
        return GuestKernelChoice(
            kernel=k.path, digest=k.digest, modules=[], source="minimal", acpi=False, append=MINIMAL_APPEND
        )
    image = recipe_image(home)
    mods_root = next(iter(sorted((image.rootfs / "lib" / "modules").iterdir())))
    wanted = [*(MICROVM_MODULES if machine == "microvm" else Q35_MODULES), *(NET_MODULES if net else ())]
    return GuestKernelChoice(
        kernel=image.kernel,
        digest=image.manifest.artifacts["kernel"].sha256,
        modules=guestinit.module_order(mods_root, wanted),
        source="golden",
    )


def rootfs_cache(home: Home) -> Path:
    """Unpacked image layers as cpio, by manifest digest (built from re-hashed blobs, inside the home)."""
    return home.cache / "job-rootfs"


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise KeyboardInterrupt so teardown runs (main thread only).

    SIGINT is set explicitly too: a runner started in the background by a non-interactive shell
    inherits SIGINT as *ignored*, and Python then never installs its own handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_job(
    home: Home,
    spec: JobSpec,
    *,
    spec_dir: Path,
    output_dir: Path | None = None,
    runtime: str = "qemu",
    machine: str = "microvm",
    kernel: str = "golden",
    transport: Transport | None = None,
    stream: Callable[[str], None] | None = None,
    kind: str = "job-run",
    network_options: dict[str, Any] | None = None,
    on_result: Callable[[evidence.Step, jobresult.GuestResult], None] | None = None,
    probe_script: Callable[[dict[str, str]], str] | None = None,
) -> JobResult:
    """Run ``spec`` to completion. Raises ``RefusedError`` (pin, signature, inputs) and
    ``UsageError`` (inputs, ``--out``) before anything is created, ``OperationalError`` when the
    guest yields no result, ``RefusedError`` for a result this run's init did not frame."""
    inputs = {
        **{"job_id": spec.id, "image": spec.image, "runtime": runtime, "machine": machine, "kernel": kernel},
        **{
            "command": list(spec.command),
            "egress": spec.egress.model_dump(mode="json"),
            "timeout_s": spec.timeout,
            "limits": spec.limits.model_dump(mode="json"),
        },
    }
    with evidence.record_step(home, kind, inputs=inputs) as step, _terminate_as_interrupt():
        found = jobfiles.confine_inputs([(i.src, i.dest) for i in spec.inputs], spec_dir, home)
        name = spec.image.split("@")[0]
        image = ocistore.resolve(home, spec.image)
        step.subject(f"image:{name}", image.digest)
        step.check("image-digest-matches-pin", ok=True, detail=f"manifest bytes hash to {image.digest}")
        keyid = imagesign.verify_image(home, name, image.digest)
        step.check("image-signature-trusted", ok=True, detail=f"simple-signing payload verified with {keyid}")
        # the job's risk tier is a gate, before anything is created (exit 3 naming each control)
        governance.gate_job(spec, image_signature=True, home=home, step=step)
        stale = jobteardown.gc(home, spec.id)
        step.observe("stale_leftovers_removed", stale)
        choice = pick_kernel(home, kernel, machine, spec.egress.networked)
        step.subject(f"guest-kernel:{choice.source}", choice.digest)
        rt = get_runtime(runtime, **_runtime_options(runtime, transport, choice))
        nonce = secrets.token_hex(4)
        run = f"{spec.id}+{nonce}"
        out = None
        if output_dir is not None or spec.outputs:
            (home.root / "jobs-out").mkdir(mode=0o700, exist_ok=True)
            out = jobfiles.claim_out_dir(output_dir or home.root / "jobs-out" / run)
        workdir = jobteardown.jobs_dir(home) / jobteardown.label(spec.id, nonce)
        fresh = workdir.with_name(f".new-{nonce}")  # gc of a concurrent run never sees it without a pid
        fresh.mkdir(parents=True, mode=0o700)
        (fresh / "runner.pid").write_text(str(os.getpid()))
        fresh.rename(workdir)
        local = rt.name == "qemu" and (transport is None or transport.url == "local://")
        watchdog = jobwatch.start(workdir, spec.timeout) if local else None
        secret = secrets.token_hex(16)  # frames the result; only the guest's init can read it
        outcome: Outcome | None = None
        collected = False
        done: tuple[str, int | None, jobresult.GuestResult | None, list[str]] = ("timeout", None, None, [])
        try:
            opts = dict(network_options or {})
            if transport is not None and transport.url != "local://":
                opts["host"] = transport
            if opts.get("uplink_netns"):
                (workdir / "uplink_netns").write_text(str(opts["uplink_netns"]))
            opts["probe_script"] = probe_script
            host_inputs = jobfiles.copy_inputs(found, workdir / "inputs")
            outcome = _boot(
                home, spec, rt, image, choice, workdir, host_inputs, machine, stream, step, opts, secret
            )
            done = _collect(spec, outcome, secret, out, step, on_result)
            collected = True
        finally:
            pid = outcome.pid if outcome else None
            log, log_checks = jobfiles.keep_console_log(
                home, spec.id, run, outcome.console_log if outcome else None
            )
            uplink = jobteardown.uplink_of(workdir)
            jobteardown.remove(workdir)
            checks = jobteardown.checks(workdir, spec.id, pid, uplink) + (outcome.checks if outcome else [])
            checks += log_checks
            for cname, ok, detail in checks:
                step.check(cname, ok=ok, detail=detail)
            if watchdog is not None:
                jobwatch.stop(watchdog)
            if out is not None:
                # a directory this run created stays if it holds outputs or the run finished
                out.release(keep=bool(done[3]) or (collected and output_dir is not None))
        step.observe("accel", outcome.accel)
        step.observe("machine", outcome.machine)
        step.observe("qemu_argv", outcome.argv)
        step.observe("wall_s", round(outcome.wall_s, 3))
        step.observe("peak_rss_kib", outcome.peak_rss_kib)
        status, rc, res, written = done
        truncated = list(res.truncated) if res else []
        if outcome.console_bytes_seen > CONSOLE_LOG_MAX:
            truncated.append({"name": "console_log", "truncated": True, "limit": CONSOLE_LOG_MAX,
                              "bytes_seen": outcome.console_bytes_seen})  # fmt: skip
        step.result.update({
            "status": status, "exit_code": rc, "avm_exit_code": int(exit_code_for(status)),
            "outputs": written,
            "output_dir": str(out.path) if out else None, "console_log": str(log) if log else None,
            "truncated": bool(truncated), "truncation": truncated,
        })  # fmt: skip
        for text in jobresult.NON_CLAIMS:
            step.non_claim(text)
        if not all(ok for _, ok, _ in checks):
            raise OperationalError(
                "job-teardown-incomplete", f"job {spec.id} left {[c for c in checks if not c[1]]}"
            )
    return JobResult(
        job_id=spec.id, status=status, exit_code=rc, stdout=res.stdout if res else "",
        stderr=res.stderr if res else "", outputs=written, output_dir=out.path if out else None,
        wall_s=outcome.wall_s, peak_rss_kib=outcome.peak_rss_kib, receipt_id=step.receipt_id, checks=checks,
        truncated=truncated, console_log=log,
    )  # fmt: skip


def exit_code_for(status: str) -> ExitCode:
    """avm's own exit code for a job outcome; the job's code is reported, never passed through."""
    return {"ok": ExitCode.OK, "failed": ExitCode.JOB_FAILED, "timeout": ExitCode.TIMEOUT}[status]


def _collect(
    spec: JobSpec, outcome: Outcome, secret: str, out: jobfiles.OutDir | None, step: evidence.Step,
    on_result: Callable[[evidence.Step, jobresult.GuestResult], None] | None,
) -> tuple[str, int | None, jobresult.GuestResult | None, list[str]]:  # fmt: skip
    """The run's outcome from the framed result (the guest is gone by now)."""
    if outcome.result_overflow:
        raise OperationalError(
            "job-result-too-large",
            f"the guest wrote more than {outcome_limit(spec)} bytes to the result port and was stopped",
            hint="fewer or smaller outputs; limits.output_bytes bounds what is kept",
        )
    vm = outcome.machine != "kata"  # kata: containerd's VM, not a command line or an init of avm's
    if vm and not spec.egress.networked:
        nic = [a for a in outcome.argv if a in ("-netdev", "-nic", "-net")]
        detail = f"-nodefaults and no NIC option on the QEMU command line ({nic or 'none'})"
        step.check("egress-no-nic-qemu-argv", ok="-nodefaults" in outcome.argv and not nic, detail=detail)
    if outcome.timed_out:
        step.non_claim("the job timed out: no result, so the guest's own view (NICs, mounts) is not recorded")
        return "timeout", None, None, []
    res = jobresult.parse(outcome.result_path, secret, spec.limits.stdio_bytes, spec.limits.output_bytes)
    step.check("result-framed", ok=True, detail="one archive framed with this run's secret, nothing else")
    fields = res.root_mount.split()
    nosuid = len(fields) > 3 and "nosuid" in fields[3].split(",")
    if vm:
        step.check("guest-root-nosuid", ok=nosuid, detail=res.root_mount or "no mount line for /")
    if vm and not spec.egress.networked:
        step.check("egress-no-nic-in-guest", ok=res.netdevs == ["lo"], detail=f"guest links: {res.netdevs}")
    if on_result is not None:
        on_result(step, res)
    written = jobresult.extract_outputs(res, spec.outputs, out.path, spec.limits.output_bytes) if out else []
    return ("ok" if res.rc == 0 else "failed"), res.rc, res, written


def guest_limits(limits: JobLimits) -> dict[str, int]:
    """The byte limits the guest's init enforces (``/.avm/limits``)."""
    return {"AVM_STDIO_LIMIT": limits.stdio_bytes, "AVM_OUTPUT_LIMIT": limits.output_bytes,
            "AVM_CONSOLE_LIMIT": CONSOLE_STREAM_MAX}  # fmt: skip


def outcome_limit(spec: JobSpec) -> int:
    """Bytes the result port may hold: outputs, stdout and stderr, plus tar headers and padding."""
    return spec.limits.output_bytes + 2 * spec.limits.stdio_bytes + RESULT_SLACK


def _runtime_options(runtime: str, transport: Transport | None, choice: GuestKernelChoice) -> dict[str, Any]:
    if runtime != "qemu":
        return {}
    from controlplane.vm.accel import probe_accel

    if transport is not None and transport.url != "local://":
        return {"transport": transport, "accel": os.environ.get("AVM_ACCEL") or "tcg"}
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    return {"accel": probe_accel(choice.kernel, busybox)}


def _boot(
    home: Home, spec: JobSpec, rt: Runtime, image: ocistore.StoredImage, choice: GuestKernelChoice,
    workdir: Path, host_inputs: dict[str, Path], machine: str, stream: Callable[[str], None] | None,
    step: evidence.Step, net_options: dict[str, Any], secret: str,
) -> Outcome:  # fmt: skip
    probe = net_options.pop("probe_script", None)
    if rt.name == "kata":  # containerd unpacks the image itself; no NIC (egress is not wired for kata)
        if spec.egress.networked:
            raise OperationalError(
                "egress-unavailable", "egress allowlists are not supported with --runtime kata"
            )
        archive = workdir / "image.tar"
        tag = f"{image.name}:avm-{image.digest.split(':')[1][:12]}"
        ocistore.export_archive(home, image, archive, tag)
        return rt.run(
            Launch(job_id=spec.id, marker=workdir.name, workdir=workdir, kernel=choice.kernel,
                   initramfs=archive, vcpus=spec.vcpus, memory_mib=spec.memory, timeout_s=spec.timeout,
                   image_archive=archive, image_ref=tag, argv=spec.command, env=spec.env, stream=stream,
                   secret=secret, stdio_max=spec.limits.stdio_bytes, result_max=outcome_limit(spec))
        )  # fmt: skip
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    gateway_options = net_options.pop("gateway", None)
    with _network(spec, jobteardown.egress_label(workdir.name), net_options) as net, \
            jobgateway.listener(home, spec, net, gateway_options) as gw:  # fmt: skip
        initramfs = workdir / "initramfs.cpio"
        size, hit, stripped = guestinit.build_initramfs(
            rootfs_cache(home), ocistore.store_dir(home), image, initramfs,
            busybox=busybox, modules=choice.modules, argv=spec.command,
            env={**spec.env, **jobgateway.env(gw)},
            outputs=spec.outputs, inputs=host_inputs, net=net.guest_env if net else None,
            secret=secret, limits=guest_limits(spec.limits),
            probe_script=probe(dict(net.guest_env) if net else {}) if probe else None,
            etc_files=gw.guest_files if gw else None,
        )  # fmt: skip
        step.observe("initramfs_bytes", size)
        step.observe("image_rootfs_cache", "hit, blobs and cpio re-hashed" if hit else "built")
        step.observe("setid_bits_stripped", stripped)
        launch = Launch(
            job_id=spec.id, marker=workdir.name, workdir=workdir, kernel=choice.kernel, initramfs=initramfs,
            vcpus=spec.vcpus, memory_mib=spec.memory, timeout_s=spec.timeout, machine=machine, stream=stream,
            acpi=choice.acpi, extra_append=choice.append, secret=secret,
            stdio_max=spec.limits.stdio_bytes, result_max=outcome_limit(spec),
            net_args=net.qemu_args_for(machine) if net else (), netns=net.netns if net else None,
        )  # fmt: skip
        outcome: Outcome = rt.run(launch)
        if net is not None:
            step.observe("egress_counters", net.counters())
            denials = net.denials()
            step.observe("egress_denials", denials)
            # each denied destination is an audit event of the job's step (fixed vocabulary)
            for event in auditevents.egress_denied(denials, spec.id):
                step.event(event.pop("type"), **event)
        jobgateway.record(step, spec.id, gw)
    if net is not None:  # closed now: the egress module tore the namespace down and checked it
        for cname, ok, detail in net.teardown_checks(wait=0):
            step.check(f"egress-{cname}", ok=ok, detail=detail)
    return outcome


@contextlib.contextmanager
def _network(spec: JobSpec, label: str, options: dict[str, Any]) -> Iterator[JobNetwork | None]:
    if not spec.egress.networked:
        yield None  # no NIC at all: the guest has only loopback
        return
    ports = spec.egress.policy.ports  # names: only the gateway's listener on the guest's link
    with egress.job_network(spec.id, list(spec.egress.allow), label, gateway_ports=ports, **options) as net:
        yield net
