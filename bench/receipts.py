"""Receipt store: append throughput, verification time, and verification peak memory by chain length.

Appends go through the product path (``evidence.record_step``: sign, lock, write, fsync, rename).
The 1k/100k chains used only for the memory rows are generated with the same code but without
fsync (``ledger.append(durable=False)``), which is labelled in the table. Verification runs in a
fresh subprocess per chain so its peak RSS is its own. Prints a table; asserts nothing.

    python bench/receipts.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from controlplane.evidence import keys, ledger
from controlplane.evidence import step as evidence
from controlplane.evidence.receipt import seal
from controlplane.home import Home

VERIFY_CHILD = """
import json, resource, sys, time, tracemalloc
from pathlib import Path
from controlplane.evidence import keys, verify
tracemalloc.start()
home = Path(sys.argv[1])
t0 = time.perf_counter()
trusted = keys.load_trusted([home / "keys" / "receipt-signing.pub"])
report = verify.verify(trusted, directory=home / "receipts")
elapsed = time.perf_counter() - t0
print(json.dumps({"count": report.count, "s": elapsed, "py_peak": tracemalloc.get_traced_memory()[1],
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def durable_appends(home: Home, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        with evidence.record_step(home, "bench", inputs={"i": i}) as step:
            step.subject("artifact", "sha256:" + f"{i:064x}")
            step.observe("n", i)
    return time.perf_counter() - start


def fast_chain(home: Home, n: int) -> float:
    """The same statements, signed and chained, without fsync (chain generation for memory rows)."""
    signer = keys.load_signer(home)
    timing = {"started": "2026-01-01T00:00:00Z", "finished": "2026-01-01T00:00:00Z", "duration_s": 0.0}
    start = time.perf_counter()
    for i in range(n):
        step = evidence.Step("bench", {"i": i})
        step.subject("artifact", "sha256:" + f"{i:064x}")
        step.observe("n", i)

        def build(seq: int, prev: str | None, step: evidence.Step = step) -> bytes:
            return seal(step.statement(seq, prev, "ok", timing), signer)

        ledger.append(home.receipts, build, durable=False)
    return time.perf_counter() - start


def verify_in_child(home: Home) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", VERIFY_CHILD, str(home.root)], capture_output=True, text=True, check=True
    )
    doc: dict[str, float] = json.loads(out.stdout)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--appends", type=int, default=10000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="avm-bench-") as tmp:
        home = Home(Path(tmp) / "durable").ensure()
        keys.init(home)
        elapsed = durable_appends(home, args.appends)
        rows.append(
            (f"append {args.appends} receipts (fsync, product path)", f"{args.appends / elapsed:,.0f}/s")
        )
        rows.append(("  per append", f"{elapsed / args.appends * 1000:.2f} ms"))
        base_rss = None
        for n in sizes:
            chain = Home(Path(tmp) / f"chain-{n}").ensure()
            keys.init(chain)
            gen = fast_chain(chain, n)
            res = verify_in_child(chain)
            assert res["count"] == n  # the bench measures a chain that verifies
            base_rss = base_rss or res["rss_kib"]
            rows.append((f"generate {n} receipts (no fsync)", f"{gen:.1f} s ({n / gen:,.0f}/s)"))
            rows.append((f"verify {n} receipts", f"{res['s']:.2f} s ({n / res['s']:,.0f}/s)"))
            rows.append(
                (
                    f"  verify peak memory at {n}",
                    f"RSS {res['rss_kib'] / 1024:.1f} MiB ({res['rss_kib'] / base_rss:.2f}x smallest), "
                    f"python heap {res['py_peak'] / 1024:.0f} KiB",
                )
            )
            ledger_files = ledger.count_files(chain.receipts)
            rows.append((f"  files in store at {n}", f"{ledger_files}"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
