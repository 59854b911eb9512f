"""Tier-2 jobs: latency from spec to exit against a bare QEMU boot of the same kernel + initramfs.

For each guest kernel (the golden image's cloud kernel, then the minimal tinyconfig kernel when
it is built) and each machine type, in one run:

* job: ``run_job`` from the spec file (validate, resolve + verify the signed pin, build the
  initramfs, boot, result, teardown, verified checks, signed receipt), median of N;
* floor: ``qemu-system-x86_64`` alone, same argv, kernel and initramfs (built once, untimed),
  running the same command: the physical floor;
* overhead = job / floor - 1 (target <= 15%); jobs/min with 2 jobs in parallel on this 2-core
  host; peak RSS of QEMU per job (ru_maxrss) and of the runner.

    python bench/jobs.py [-n 5] [--throughput 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from controlplane.evidence import keys
from controlplane.home import Home
from controlplane.image import sign as imagesign
from controlplane.jobs import guest as guestinit
from controlplane.jobs.oci import store as ocistore
from controlplane.jobs.runner import guest_limits, pick_kernel, rootfs_cache, run_job
from controlplane.jobs.runtime import Launch
from controlplane.jobs.runtime.qemu import qemu_argv
from controlplane.jobs.spec import JobLimits, load_jobspec
from controlplane.release import cosign
from controlplane.release import trust as signing
from controlplane.vm.accel import require_tsc_khz

COMMAND = ["/bin/sh", "-c", "echo hello-from-job"]


def setup(base: Path) -> tuple[Home, str, Path]:
    home = Home(base / "home").ensure()
    keys.init(home)
    private, public = cosign.generate_keypair(b"pw")
    (base / "cosign.pub").write_bytes(public)
    signing.trust_release_key(home, base / "cosign.pub", "bench")
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    image = ocistore.build_job_image(home, "bench/hello", {}, busybox=busybox)
    imagesign.sign_image(home, image.name, image.digest, private, b"pw")
    spec = base / "job.json"
    doc = {"id": "bench", "image": image.ref, "command": list(COMMAND), "timeout": 120, "risk_tier": "L1"}
    spec.write_text(json.dumps(doc))
    return home, image.ref, spec


def floor_once(home: Home, ref: str, kernel: str, machine: str, tmp: Path) -> tuple[float, int]:
    choice = pick_kernel(home, kernel, machine, net=False)
    initramfs = tmp / f"floor-{kernel}-{machine}.cpio"
    if not initramfs.exists():  # the very initramfs a job builds, made once and untimed
        busybox = Path(shutil.which("busybox") or "/bin/busybox")
        guestinit.build_initramfs(rootfs_cache(home), ocistore.store_dir(home), ocistore.resolve(home, ref),
                                  initramfs, busybox=busybox, modules=choice.modules, argv=COMMAND, env={},
                                  outputs=(), inputs={}, net=None, secret="0" * 32,
                                  limits=guest_limits(JobLimits()))  # fmt: skip
    launch = Launch(job_id="floor", marker="avm-bench-floor", workdir=tmp, kernel=choice.kernel,
                    initramfs=initramfs, vcpus=1, memory_mib=256, timeout_s=120, machine=machine,
                    acpi=choice.acpi, extra_append=choice.append)  # fmt: skip
    result = tmp / "floor-result.tar"
    argv = qemu_argv(launch, accel="tcg", tsc_khz=require_tsc_khz(Path("/proc/cpuinfo").read_text()),
                     result_path=str(result), kernel=str(choice.kernel), initrd=str(initramfs))  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    assert b"hello-from-job" in result.read_bytes(), "floor run produced no result"
    return wall, int(usage.ru_maxrss)


def job_once(home: Home, spec: Path, kernel: str, machine: str) -> tuple[float, int]:
    start = time.monotonic()
    result = run_job(home, load_jobspec(spec), spec_dir=spec.parent, kernel=kernel, machine=machine)
    wall = time.monotonic() - start
    assert result.exit_code == 0 and result.stdout == "hello-from-job\n", result
    return wall, result.peak_rss_kib


def throughput(home: Home, spec: Path, kernel: str, machine: str, count: int) -> float:
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda _: job_once(home, spec, kernel, machine), range(count)))
    return count / (time.monotonic() - start) * 60


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--throughput", type=int, default=8)
    parser.add_argument("--machines", default="microvm,q35")
    args = parser.parse_args()
    os.environ.setdefault("AVM_IMAGE_CACHE", "/var/tmp/avm-image-cache")
    from controlplane.jobs import kernel as guestkernel

    kernels = ["golden"] + (["minimal"] if guestkernel.cached(Path("/var/tmp/avm-guest-kernel")) else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="avm-bench-jobs-") as tmpdir:
        tmp = Path(tmpdir)
        home, ref, spec = setup(tmp)
        job_once(home, spec, "golden", "microvm")  # warm: accel probe cache, page cache
        for kernel in kernels:
            for machine in args.machines.split(",") if kernel == "golden" else ["microvm"]:
                floors, jobs = [], []
                for _ in range(args.n):  # interleaved, so load from elsewhere hits both alike
                    floors.append(floor_once(home, ref, kernel, machine, tmp))
                    jobs.append(job_once(home, spec, kernel, machine))
                f, j = statistics.median(w for w, _ in floors), statistics.median(w for w, _ in jobs)
                per_min = (
                    throughput(home, spec, kernel, machine, args.throughput) if machine == "microvm" else 0.0
                )
                rss = max(r for _, r in jobs)
                rows.append((kernel, machine, j, f, j / f - 1, per_min, rss))
                print(f"  measured {kernel}/{machine}: job {j:.2f}s floor {f:.2f}s", file=sys.stderr)
        kinfo = guestkernel.cached(Path("/var/tmp/avm-guest-kernel"))
    runner = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nTier-2 job latency, n={args.n} each (median), TCG, {os.cpu_count()} cores, command {COMMAND}")
    head = ("kernel", "machine", "job s", "floor s", "overhead", "jobs/min", "QEMU peak RSS")
    print(f"{head[0]:<8} {head[1]:<8} {head[2]:>7} {head[3]:>8} {head[4]:>9} {head[5]:>9} {head[6]:>14}")
    for kernel, machine, j, f, over, per_min, rss in rows:
        tput = f"{per_min:9.1f}" if per_min else f"{'-':>9}"
        print(f"{kernel:<8} {machine:<8} {j:7.2f} {f:8.2f} {over:9.1%} {tput} {rss / 1024:11.0f} MiB")
    print(f"runner (this process) peak RSS: {runner / 1024:.0f} MiB")
    if kinfo:
        print(f"minimal kernel: {kinfo.path} sha256 {kinfo.digest} (config {kinfo.config_digest})")


if __name__ == "__main__":
    main()
