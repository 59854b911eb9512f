"""Golden image build (cold and warm) and boot-to-SSH for nspawn and qemu, side by side.

Boot-to-SSH is what ``avm vm up`` measures: from the start of the backend's boot to the first
successful SSH login (the banner alone is not enough). Each run boots a fresh VM with its own
keys and overlay, then tears it down. ``systemd-analyze`` is read inside one VM of each backend.
The 25 s baseline is the shell reference's QEMU/TCG golden boot on this kind of machine.

Needs root. Prints a table; asserts nothing.

    python bench/boot.py [--runs 5] [--cold]      # --cold also times a from-scratch image build
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from controlplane.evidence import keys
from controlplane.home import Home
from controlplane.image.build import build_image
from controlplane.image.golden import IMAGE_CACHE_ENV, load_image
from controlplane.image.recipe import DEFAULT_RECIPE, load_recipe
from controlplane.vm import lifecycle
from controlplane.vm.base import VmSpec

BASELINE_S = 25.0


def build(store: Path) -> tuple[float, bool]:
    t0 = time.perf_counter()
    result = build_image(load_recipe(DEFAULT_RECIPE), store, progress=lambda _: None)
    return time.perf_counter() - t0, bool(result.cached)


def boots(home: Home, backend: str, runs: int) -> tuple[list[float], str]:
    samples: list[float] = []
    analyze = ""
    for i in range(runs):
        name = f"b{backend[:2]}{i}"
        record = lifecycle.up(home, VmSpec(name=name, backend=backend, timeout_s=600), load_image(home))
        try:
            receipt_s = _boot_to_ssh(home)
            samples.append(receipt_s)
            if i == 0:
                out = lifecycle.ssh(home, name, ["systemd-analyze"], timeout=120)
                analyze = out.stdout.strip().splitlines()[0] if out.stdout.strip() else out.stderr.strip()
        finally:
            lifecycle.down(home, record.name)
    return samples, analyze


def _boot_to_ssh(home: Home) -> float:
    from controlplane.evidence import ledger
    from controlplane.evidence.receipt import open_receipt

    head = ledger.read_head(home.receipts)
    statement = open_receipt(ledger.read(home.receipts, head.seq))[2]
    return float(statement.predicate.result["boot_to_ssh_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="also time a from-scratch image build")
    parser.add_argument("--backends", default="nspawn,qemu")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    store = Path(os.environ.get(IMAGE_CACHE_ENV, "/var/tmp/avm-image-cache"))
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="avm-bench-cold-", dir="/var/tmp") as cold:
            seconds, _ = build(Path(cold))
            rows.append(("image build, cold (fresh store)", f"{seconds:.1f} s"))
    seconds, cached = build(store)
    rows.append((f"image build, warm (cached={cached})", f"{seconds:.2f} s"))
    os.environ[IMAGE_CACHE_ENV] = str(store)
    with tempfile.TemporaryDirectory(prefix="avm-bench-boot-") as tmp:
        home = Home(Path(tmp) / "home").ensure()
        keys.init(home)
        for backend in args.backends.split(","):
            samples, analyze = boots(home, backend, args.runs)
            med = statistics.median(samples)
            rows.append(
                (
                    f"{backend} boot-to-SSH ({len(samples)} runs)",
                    f"median {med:.2f} s, min {min(samples):.2f}, max {max(samples):.2f}; "
                    f"{BASELINE_S / med:.1f}x faster than the {BASELINE_S:g} s baseline",
                )
            )
            rows.append((f"  systemd-analyze in {backend}", analyze))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
