"""The ``kata`` Tier-2 runtime: containerd ``ctr run --runtime io.containerd.kata.v2``.

Only where Kata is installed: containerd must run, ``ctr`` must be on PATH and the shim
``containerd-shim-kata-v2`` must be resolvable (Kata also needs working KVM). Where any is
missing it says so and runs nothing; it never falls back to another runtime silently.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from controlplane.errors import CommandFailed, OperationalError
from controlplane.evidence.step import Check
from controlplane.jobs.runtime import Launch, Outcome

SHIM = "containerd-shim-kata-v2"
RUNTIME_NAME = "io.containerd.kata.v2"
ADDRESS = "/run/containerd/containerd.sock"
NAMESPACE = "avm"


def missing() -> list[str]:
    """What this host lacks for Kata jobs (empty when everything is there)."""
    out = [tool for tool in ("ctr", "containerd", SHIM) if shutil.which(tool) is None]
    return out


def require() -> None:
    """Raises ``OperationalError('kata-unavailable')`` naming what this host lacks for Kata."""
    lacking = missing()
    if lacking:
        raise OperationalError(
            "kata-unavailable",
            f"the kata runtime cannot run here: {', '.join(lacking)} not installed",
            hint="install Kata Containers and containerd (Kata needs working KVM), or use --runtime qemu",
            details={"missing": lacking, "expected": ["ctr", "containerd", SHIM]},
        )


def ctr_argv(
    image_ref: str, container_id: str, argv: list[str], env: dict[str, str], address: str
) -> list[str]:
    """The ``ctr run`` command for a job (pure)."""
    envs = [a for k, v in sorted(env.items()) for a in ("--env", f"{k}={v}")]
    return ["ctr", "-a", address, "-n", NAMESPACE, "run", "--rm", "--runtime", RUNTIME_NAME,
            *envs, image_ref, container_id, *argv]  # fmt: skip


class KataRuntime:
    name = "kata"

    def __init__(self, address: str = ADDRESS) -> None:
        self.address = address

    def leftovers(self, marker: str) -> list[str]:
        if missing():
            return []
        res = subprocess.run(["ctr", "-a", self.address, "-n", NAMESPACE, "containers", "list", "-q"],
                             capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        return [f"container {c}" for c in res.stdout.split() if c == container_id(marker)]

    def run(self, launch: Launch) -> Outcome:
        """Import the pinned image into containerd and ``ctr run`` it with the Kata shim; kill the
        task at the deadline. Raises ``OperationalError('kata-unavailable')`` naming what is missing."""
        require()
        assert launch.image_archive is not None
        ctr = ["ctr", "-a", self.address, "-n", NAMESPACE]
        imported = subprocess.run([*ctr, "images", "import", str(launch.image_archive)],
                                  capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        if imported.returncode != 0:
            raise CommandFailed(imported.args, imported.returncode, imported.stdout, imported.stderr)
        cid = container_id(launch.marker)
        argv = ctr_argv(launch.image_ref, cid, list(launch.argv), dict(launch.env), self.address)
        log = launch.workdir / "console.log"
        start, timed_out, rc = time.monotonic(), False, None
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                rc = proc.wait(timeout=launch.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                subprocess.run(
                    [*ctr, "tasks", "kill", "-s", "SIGKILL", cid],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                proc.kill()
                proc.wait()
            finally:
                subprocess.run([*ctr, "containers", "rm", cid], capture_output=True, timeout=30, check=False)
        left = self.leftovers(launch.marker)
        return Outcome(
            timed_out=timed_out, qemu_rc=rc, result_path=_result(rc, log, launch), console_log=log,
            wall_s=time.monotonic() - start, accel="kata", machine="kata", argv=argv,
            checks=[Check("kata-container-removed", not left, f"container {cid}: {left or 'gone'}")],
            notes=["outputs are not copied out of Kata containers"],
        )  # fmt: skip


def container_id(marker: str) -> str:
    return marker.replace("+", "-")


def _result(rc: int | None, log: Path, launch: Launch) -> Path:
    """The exit status containerd reported (from the shim, not from the job's output) as a framed
    result tar (see ``controlplane.jobs.result``)."""
    from controlplane._internal.archive import Member, tar_bytes
    from controlplane.jobs.result import HEADER, TRAILER

    path = launch.workdir / "result.tar"
    path.write_bytes(b"")
    if rc is None:
        return path
    with open(log, "rb") as fh:
        console = fh.read(launch.stdio_max)
    frame = tar_bytes(
        Member(n, d) for n, d in (("rc", f"{rc}\n".encode()), ("stdout", console), ("stderr", b""))
    )
    secret = launch.secret.encode()
    path.write_bytes(HEADER + secret + b"\n" + frame + TRAILER + secret + b"\n")
    return path
