"""Tier-1 status and dry-run promote latency by profile count, against one SSH call per check.

Boots an nspawn golden VM, promotes a generated hello-agent with N profiles (1, 10, 50), then
measures in one run, side by side:

- ``avm status`` (one round trip: the facts gatherer, with the sandbox probe run inside it; then
  the pure drift diff and a receipt);
- ``avm promote`` dry-run (resolve, verify signature, gather, plan, receipt);
- the shell reference's way: one SSH command per check (readlink, sha256sum of each file,
  systemctl is-active, id) over the same paramiko connection.

Needs root and a built golden image (``avm image build``). Prints a table; asserts nothing.

    python bench/promote.py [--profiles 1,10,50] [--runs 5]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from controlplane.evidence import keys
from controlplane.home import Home
from controlplane.image.current import recipe_image
from controlplane.promote import pipeline as promotion
from controlplane.promote import status
from controlplane.promote.layout import LAYOUT
from controlplane.release import trust as signing
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from controlplane.vm import lifecycle
from controlplane.vm.base import VmSpec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello-agent"
PASSWORD = b"bench-only-password"
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "b",
    "GIT_AUTHOR_EMAIL": "b@x",
    "GIT_COMMITTER_NAME": "b",
    "GIT_COMMITTER_EMAIL": "b@x",
}


def make_repo(root: Path, n: int) -> Path:
    repo = root / f"agent-{n}"
    shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    profiles = [
        {
            "name": f"p{i:02d}",
            "risk_tier": "L1",
            "entrypoint": ["python3", "agent.py"],
            "env": {"GATEWAY_PORT": str(19000 + i)},
            "health": {"port": 19000 + i, "path": "/healthz", "timeout_s": 60},
        }
        for i in range(n)
    ]
    (repo / "avm.yaml").write_text(yaml.safe_dump({"soak_s": 0, "profiles": profiles}))
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-qm", f"{n} profiles"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, env=GIT_ENV, capture_output=True)
    return repo


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def per_check_loop(ssh: SshTransport, names: list[str], sha: str) -> int:
    """How the shell reference checks a host: one SSH round trip per fact."""
    calls = 0
    files = ssh.run(["find", f"/opt/agent/releases/{sha}", "-type", "f"], timeout=60).stdout.split()
    calls += 1
    for path in files:
        ssh.run(["sha256sum", path], timeout=60)
        calls += 1
    ssh.run(["sha256sum", LAYOUT.unit_template], timeout=60)
    calls += 1
    for name in names:
        for argv in (
            ["readlink", LAYOUT.current_link(name)],
            ["sha256sum", LAYOUT.env_file(name)],
            ["sha256sum", LAYOUT.policy_file(name)],
            ["sha256sum", LAYOUT.dropin(name)],
            ["systemctl", "is-active", f"agent-gateway@{name}.service"],
            ["id", "-u", f"agent-{name}"],
        ):
            ssh.run(argv, timeout=60)
            calls += 1
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", default="1,10,50")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="avm-bench-promote-") as tmp:
        root = Path(tmp)
        for n in [int(x) for x in args.profiles.split(",")]:
            home = Home(root / f"home-{n}").ensure()
            keys.init(home)
            _, key, pub = signing.release_init(root / f"key-{n}", PASSWORD)
            signing.trust_release_key(home, pub, "bench")
            repo = make_repo(root, n)
            sha = signing.sign_release(home, repo, "HEAD", key, PASSWORD).commit
            vm = f"bench{n}"
            lifecycle.up(home, VmSpec(name=vm, backend="nspawn", timeout_s=120), recipe_image(home))
            try:
                t0 = time.perf_counter()
                promotion.run(home, repo=repo, ref=sha, target=vm, apply=True)
                first_apply = time.perf_counter() - t0
                st = timed(functools.partial(status.check, home, vm), args.runs)
                dry = timed(functools.partial(promotion.run, home, repo=repo, ref=sha, target=vm), args.runs)
                names = [f"p{i:02d}" for i in range(n)]
                with SshTransport.from_target(inventory.load(home, vm)) as ssh:
                    calls = per_check_loop(ssh, names, sha)
                    loop = timed(functools.partial(per_check_loop, ssh, names, sha), args.runs)
            finally:
                lifecycle.down(home, vm)
            rows.append((n, first_apply, st, dry, loop, calls))
    print(
        f"{'profiles':>8} {'apply s':>8} {'status s':>9} {'dry-run s':>10} {'per-check s':>12} {'calls':>6} "
        f"{'per-check/status':>17}"
    )
    for n, first_apply, st, dry, loop, calls in rows:
        s, d, lp = statistics.median(st), statistics.median(dry), statistics.median(loop)
        print(f"{n:>8} {first_apply:>8.1f} {s:>9.2f} {d:>10.2f} {lp:>12.2f} {calls:>6} {lp / s:>16.1f}x")
    print(
        f"(medians of {args.runs} runs; status and dry-run each make one SSH round trip; "
        "status's includes the sandbox probe)"
    )


if __name__ == "__main__":
    main()
