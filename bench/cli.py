"""How long `avm --help` takes, next to a bare interpreter start, in one run.

Heavy stacks (paramiko, cryptography, pulumi, libvirt) are imported lazily; this shows the cost
that remains. Prints a table; asserts nothing.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def timed(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        out.append(time.perf_counter() - start)
    return out


def main(runs: int = 20) -> None:
    rows = {
        "python -c pass (floor)": timed([sys.executable, "-c", "pass"], runs),
        "avm --help": timed([sys.executable, "-m", "controlplane", "--help"], runs),
        "avm vm --help": timed([sys.executable, "-m", "controlplane", "vm", "--help"], runs),
    }
    floor = statistics.median(rows["python -c pass (floor)"])
    print(f"{'command':<26} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'x floor':>8}")
    for name, samples in rows.items():
        med = statistics.median(samples)
        print(
            f"{name:<26} {med * 1000:>10.1f} {min(samples) * 1000:>8.1f} "
            f"{max(samples) * 1000:>8.1f} {med / floor:>8.2f}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
