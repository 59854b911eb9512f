"""The watchdog of one job run: it outlives the runner and tears the job down if the runner dies.

The runner starts ``python -m controlplane.jobs.watch BUDGET_S`` in a session of its own, holding
the write end of the watchdog's stdin. The work dir is passed in the environment, so the
watchdog's command line never carries the run's marker (teardown checks look for that marker).
Two mechanisms cover a runner killed with ``kill -9`` (which runs no handler):

* QEMU is started with ``PR_SET_PDEATHSIG=SIGKILL``: the kernel kills it the moment the runner
  dies;
* the watchdog sees EOF on its stdin (the kernel closed the runner's end) and removes what the
  run left: any process carrying the run's marker, the job network (netns, tap, veth, nft
  table) and the work dir, exactly as ``avm job gc`` would.

If the runner lives but the guest is still running ``BUDGET_S`` after the watchdog started
(the job's timeout plus a setup margin), the watchdog kills the guest; the runner's own
teardown then runs as usual. A runner that finishes writes ``done`` and the watchdog exits.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

SETUP_MARGIN_S = 60.0
ENV = "AVM_JOBWATCH_WORKDIR"  # boot, network and initramfs before the job's own timeout starts


def start(workdir: Path, timeout_s: float) -> subprocess.Popen[bytes]:
    """Start the watchdog of ``workdir``; the caller keeps ``proc.stdin`` open and calls ``stop``."""
    argv = [sys.executable, "-m", "controlplane.jobs.watch", str(timeout_s + SETUP_MARGIN_S)]
    return subprocess.Popen(
        argv,
        env={**os.environ, ENV: str(workdir)},
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """The runner finished its own teardown: the watchdog exits without touching anything."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"done\n")
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def watch(workdir: Path, budget_s: float) -> str:
    """Block until the runner says done (-> "done") or dies (-> "torn-down", after teardown)."""
    from controlplane.jobs import teardown as jobteardown
    from controlplane.vm import procs

    deadline = time.monotonic() + budget_s
    stopped_guest = False
    while True:
        wait = None if stopped_guest else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([0], [], [], wait)
        if ready:
            data = os.read(0, 64)
            if data.startswith(b"done"):
                return "done"
            if not data:  # the runner is gone, by whatever signal
                jobteardown.remove(workdir)
                return "torn-down"
        elif not stopped_guest:  # the guest ran past its whole budget: stop it, keep watching
            pids = procs.pids_with_marker(workdir.name)
            if pids:
                procs.signal_pids(pids, signal.SIGKILL)
            stopped_guest = True


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the runner is not for the watchdog
    print(watch(Path(os.environ[ENV]), float(sys.argv[1])))
