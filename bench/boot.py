"""Golden image build, and cold, snapshot-making and warm starts for qemu and nspawn, side by side.

Every figure is what ``avm vm up`` measures in its receipt: ``up_total_s``, from the start of
the boot to the first successful SSH login (a real login, not the banner). For qemu: ``cold``
is ``--cold`` (no snapshot used or made), ``snapshot`` the first start on an empty snapshot
store (a cold boot that also saves the booted state), ``warm`` a restore of that snapshot with
the VM's own identity delivered. nspawn has no snapshot: its boot is its only path. Each run
boots a fresh VM with its own keys and overlay and tears it down. ``systemd-analyze`` (and the
slowest units) is read inside one cold VM of each backend. 16.9 s is the qemu/TCG cold boot
before warm starts existed (same machine).

Needs root. Prints a table; asserts nothing.

    python bench/boot.py [--runs 3] [--cold-build]   # --cold-build also times a from-scratch image build
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from controlplane.evidence import keys
from controlplane.home import Home
from controlplane.image.build import build_image
from controlplane.image.current import recipe_image
from controlplane.image.golden import IMAGE_CACHE_ENV
from controlplane.image.recipe import DEFAULT_RECIPE, load_recipe
from controlplane.vm import lifecycle
from controlplane.vm.base import VmSpec
from controlplane.vm.snapshot import SNAPSHOT_CACHE_ENV

BASELINE_S = 16.9


def build(store: Path) -> tuple[float, bool]:
    t0 = time.perf_counter()
    result = build_image(load_recipe(DEFAULT_RECIPE), store, progress=lambda _: None)
    return time.perf_counter() - t0, bool(result.cached)


def start(
    home: Home, name: str, backend: str, *, cold: bool = False, analyze: bool = False
) -> dict[str, Any]:
    """One ``vm up`` + ``vm down``; the receipt's figures (and systemd-analyze when asked)."""
    record = lifecycle.up(
        home, VmSpec(name=name, backend=backend, cold=cold, timeout_s=600), recipe_image(home)
    )
    try:
        predicate = _last_vm_up(home)
        row: dict[str, Any] = {
            "up_total_s": float(predicate.result["up_total_s"]),
            "path": predicate.result.get("start_path", "cold"),
            "warm_start": predicate.observations.get("warm_start", {}),
        }
        if analyze:
            out = lifecycle.ssh(home, name, ["sh", "-c", ANALYZE], timeout=120)
            row["analyze"] = out.stdout.strip() or out.stderr.strip()
    finally:
        lifecycle.down(home, record.name)
    return row


# SSH works before the rest of the boot is done (sshd and the gate go first): wait for it
ANALYZE = (
    "timeout 60 systemctl is-system-running --wait >/dev/null; "
    "systemd-analyze | head -n 1; systemd-analyze blame --no-pager | head -n 8"
)


def _last_vm_up(home: Home) -> Any:
    from controlplane.evidence import ledger
    from controlplane.evidence.receipt import open_receipt

    head = ledger.read_head(home.receipts)
    return open_receipt(ledger.read(home.receipts, head.seq))[2].predicate


def _fmt(samples: list[float]) -> str:
    med = statistics.median(samples)
    return f"median {med:.2f} s (n={len(samples)}, {min(samples):.2f}-{max(samples):.2f})"


def qemu_rows(home: Home, runs: int) -> tuple[list[tuple[str, str]], str]:
    with tempfile.TemporaryDirectory(prefix="avm-bench-snap-") as snaps:
        os.environ[SNAPSHOT_CACHE_ENV] = snaps
        first = start(home, "bq0", "qemu", cold=True, analyze=True)
        cold = [first["up_total_s"]] + [
            start(home, f"bqc{i}", "qemu", cold=True)["up_total_s"] for i in range(1, runs)
        ]
        made = start(home, "bqs", "qemu")
        assert made["path"] == "cold" and made["warm_start"]["snapshot"]["made"], made
        warm_runs = [start(home, f"bqw{i}", "qemu") for i in range(runs)]
        assert {w["path"] for w in warm_runs} == {"warm"}, warm_runs
    warm = [w["up_total_s"] for w in warm_runs]
    detail, saved = warm_runs[-1]["warm_start"], made["warm_start"]
    med_cold, med_warm = statistics.median(cold), statistics.median(warm)
    rows = [
        (
            "qemu cold (--cold)",
            f"{_fmt(cold)}; {med_cold / BASELINE_S:.2f}x of the {BASELINE_S:g} s cold boot before",
        ),
        (
            "qemu snapshot creation",
            f"{made['up_total_s']:.2f} s (cold boot + saving the state {saved['snapshot_save_s']:.2f} s, "
            f"{saved['snapshot']['files']['state.bin']['size'] / 2**20:.0f} MiB)",
        ),
        (
            "qemu warm (restore)",
            f"{_fmt(warm)}; {med_warm / med_cold:.2f}x of cold, {med_warm / BASELINE_S:.2f}x of"
            f" {BASELINE_S:g} s (last: state loaded {detail.get('loaded_s')} s,"
            f" identity {detail.get('identity_s')} s)",
        ),
    ]
    return rows, first["analyze"]


def nspawn_rows(home: Home, runs: int) -> tuple[list[tuple[str, str]], str]:
    first = start(home, "bn0", "nspawn", analyze=True)
    cold = [first["up_total_s"]] + [start(home, f"bn{i}", "nspawn")["up_total_s"] for i in range(1, runs)]
    rows = [
        ("nspawn cold", f"{_fmt(cold)}; {statistics.median(cold) / BASELINE_S:.2f}x of {BASELINE_S:g} s"),
        ("nspawn snapshot creation", "n/a: a container has no booted-state snapshot"),
        ("nspawn warm", "n/a: its boot is its only path"),
    ]
    return rows, first["analyze"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold-build", action="store_true", help="also time a from-scratch image build")
    parser.add_argument("--backends", default="nspawn,qemu")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    store = Path(os.environ.get(IMAGE_CACHE_ENV, "/var/tmp/avm-image-cache"))
    if args.cold_build:
        with tempfile.TemporaryDirectory(prefix="avm-bench-cold-", dir="/var/tmp") as cold:
            seconds, _ = build(Path(cold))
            rows.append(("image build, cold (fresh store)", f"{seconds:.1f} s"))
    seconds, cached = build(store)
    rows.append((f"image build, warm (cached={cached})", f"{seconds:.2f} s"))
    os.environ[IMAGE_CACHE_ENV] = str(store)
    analyses: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="avm-bench-boot-") as tmp:
        home = Home(Path(tmp) / "home").ensure()
        keys.init(home)
        for backend in args.backends.split(","):
            got, analyze = (qemu_rows if backend == "qemu" else nspawn_rows)(home, args.runs)
            rows += got
            analyses.append((backend, analyze))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for backend, analyze in analyses:
        print(f"\nsystemd-analyze in a cold {backend} VM:\n{analyze}")
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
