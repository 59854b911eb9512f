"""Zero leftovers after 30 mixed jobs: normal, failing, timed out, allowlisted, and runners killed
with ``kill -9`` (their watchdog tears the run down; ``avm job gc`` then finds nothing). Uses the
minimal guest kernel when it is built (jobs take under a second), otherwise the golden image's kernel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from controlplane.home import Home
from controlplane.jobs.runner import JobResult, run_job
from controlplane.jobs.spec import load_jobspec
from tests.plugins.jobimages import JobEnv, home_pids, minimal_kernel_available
from tests.plugins.vms import AVM, run_avm
from tests.test_jobs_egress import ALLOWED, world  # noqa: F401 - the world namespace fixture

KILLED_RUNNER = """
import sys
from pathlib import Path
from controlplane.home import Home
from controlplane.jobs.runner import run_job
from controlplane.jobs.spec import load_jobspec
home, spec, kernel, world = Home(Path(sys.argv[1])), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
opts = {"uplink_netns": world}
run_job(home, load_jobspec(spec), spec_dir=spec.parent, kernel=kernel, network_options=opts)
"""


def host_state(home: Home) -> dict[str, list[str]]:
    """What of this test's jobs exists on the host (other avm runs may share the machine)."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    return {
        "qemu": [str(p) for p in home_pids(home)],
        "netns": [n.split()[0] for n in netns.splitlines() if n.startswith("avm-j") and "--mix-" in n],
        "nft": [t for t in tables.splitlines() if " avm_" in t],
        "links": [line.split(":")[1].strip() for line in links.splitlines() if ":mix-" in line],
    }


def test_thirty_mixed_jobs_leave_nothing(jobenv: JobEnv, world: tuple[str, Path]) -> None:  # noqa: F811
    kernel = "minimal" if minimal_kernel_available() else "golden"
    before = host_state(jobenv.home)
    specs: list[tuple[Path, dict[str, object]]] = []
    for i in range(6):
        specs.append((jobenv.spec(f"ok{i}", id=f"mix-ok-{i}", command=["true"]), {}))
    for i in range(4):
        allow = {"allow": [{"host": ALLOWED, "port": 8080}]}
        spec = jobenv.spec(f"net{i}", id=f"mix-net-{i}", command=["true"], egress=allow)
        specs.append((spec, {"network_options": {"uplink_netns": world[0]}}))
    for i in range(8):
        specs.append((jobenv.spec(f"fail{i}", id=f"mix-fail-{i}", command=["sh", "-c", f"exit {i + 1}"]), {}))
    for i in range(6):
        specs.append((jobenv.spec(f"slow{i}", id=f"mix-slow-{i}", command=["sleep", "60"], timeout=2), {}))

    def one(item: tuple[Path, dict[str, object]]) -> JobResult:
        path, extra = item
        return run_job(jobenv.home, load_jobspec(path), spec_dir=path.parent, kernel=kernel, **extra)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, specs))
    codes = [r.exit_code for r in results]
    assert codes == [0] * 10 + list(range(1, 9)) + [None] * 6, codes
    assert [r.status for r in results] == ["ok"] * 10 + ["failed"] * 8 + ["timeout"] * 6
    assert all(ok for r in results for _, ok, _ in r.checks), [r.checks for r in results]

    # 6 runners killed with SIGKILL while their guest runs: QEMU, the work dir (and for two of them
    # the job network: netns, tap, veth, nft table) outlive them
    for i in range(6):
        allow = {"allow": [{"host": ALLOWED, "port": 8080}]} if i >= 4 else {}
        spec = jobenv.spec(
            f"killed{i}", id=f"mix-killed-{i}", command=["sleep", "60"], timeout=60, egress=allow
        )
        env = {**os.environ, "AVM_HOME": str(jobenv.home.root)}
        argv = [*AVM, "--home", str(jobenv.home.root), "job", "run", str(spec), "--guest-kernel", kernel]
        if allow:  # the library entry point, so the network's outer end can sit in the test's namespace
            argv = [sys.executable, "-c", KILLED_RUNNER, str(jobenv.home.root), str(spec), kernel, world[0]]
        runner = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not home_pids(jobenv.home, f"mix-killed-{i}+") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert home_pids(jobenv.home, f"mix-killed-{i}+"), "the guest never started"
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    # no gc: QEMU died with its runner (parent-death signal), the watchdog removed the rest
    deadline = time.monotonic() + 30
    while host_state(jobenv.home) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert host_state(jobenv.home) == before
    assert [p.name for p in (jobenv.home.run / "jobs").iterdir() if p.is_dir()] == []
    again = run_avm(jobenv.home, "--json", "job", "gc")
    assert again.returncode == 0 and '"removed": []' in again.stdout
