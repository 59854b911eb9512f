"""Bounded output: whatever a job prints or writes, the runner's memory stays under a fixed bound,
and whatever is cut is reported (``truncated: true``, the limit, the bytes seen).

The runner's peak RSS is measured from outside the code under test: the CLI runs in a wrapper
process that reports its own ``VmHWM`` from ``/proc/self/status`` (QEMU, a child, is not in it).
Flood sizes are chosen for TCG, where a guest pipe moves a few MB/s: the host never sees more of
a flood than the limits (the guest's init cuts it), so what the bound proves does not depend on
the flood size. The result framing is tested on real files, the console pump on a real pipe.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from controlplane.errors import AvmError
from controlplane.home import Home
from controlplane.jobs import files as jobfiles
from controlplane.jobs import result as jobresult
from controlplane.jobs.runtime import CONSOLE_LOG_MAX
from tests.plugins.jobimages import JobEnv, home_pids, minimal_kernel_available

MIB = 1 << 20
RUNNER_RSS_BOUND_KIB = 128 * 1024  # python + avm + the bounded stdout/stderr (measured: 50-80 MiB)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest) across exec
HWM = "int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')).split()[1])"
WRAPPER = f"""
import os, sys
from controlplane.cli import main
try:
    main(sys.argv[1:])
finally:
    with open(os.environ["RSS_OUT"], "w") as fh:
        fh.write(str({HWM}))
"""


def run_measured(env: JobEnv, tmp: Path, spec: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    rss = tmp / f"{spec.stem}.rss"
    kernel = "minimal" if minimal_kernel_available() else "golden"
    argv = [sys.executable, "-c", WRAPPER, "--home", str(env.home.root), "--json", "job", "run", str(spec)]
    out = subprocess.run(
        [*argv, "--guest-kernel", kernel],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "RSS_OUT": str(rss)},
        check=False,
    )
    peak = int(rss.read_text())
    print(f"{spec.stem}: runner peak RSS (VmHWM) {peak} KiB, kernel {kernel}")
    return out, peak


def test_floods_and_big_outputs_keep_the_runner_bounded(jobenv: JobEnv, tmp_path: Path) -> None:
    flood = 24 * MIB
    line = "0123456789abcdef" * 4 + "\n"  # 65 bytes a line
    cmd = [
        "sh",
        "-c",
        f"yes {line.strip()} | head -c {flood}; dd if=/dev/zero bs=1M count={flood // MIB} >&2 2>/dev/null;"
        " dd if=/dev/zero of=$AVM_OUT/big bs=1M count=80 2>/dev/null; echo small > $AVM_OUT/small",
    ]
    spec = jobenv.spec("flood", id="flood", command=cmd, outputs=["big", "small"], vcpus=2, memory=512)
    out, rss = run_measured(jobenv, tmp_path, spec)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert rss < RUNNER_RSS_BOUND_KIB, rss
    assert len(doc["stdout"]) == MIB and doc["stdout"].startswith(line)
    cuts = {c["name"]: c for c in doc["truncation"]}
    assert doc["truncated"] is True
    assert cuts["stdout"] == {"name": "stdout", "truncated": True, "limit": MIB, "bytes_seen": flood}
    assert cuts["stderr"] == {"name": "stderr", "truncated": True, "limit": MIB, "bytes_seen": flood}
    # outputs: 64 MiB in all by default; "big" (sorted first) took the whole budget
    assert cuts["output:big"] == {"name": "output:big", "truncated": True, "limit": 64 * MIB,
                                  "bytes_seen": 80 * MIB}  # fmt: skip
    assert cuts["output:small"]["bytes_seen"] == 6
    outdir = Path(doc["output_dir"])
    assert (outdir / "big").stat().st_size == 64 * MIB and (outdir / "small").stat().st_size == 0
    assert Path(doc["console_log"]).stat().st_size <= CONSOLE_LOG_MAX
    result = json.loads(_receipt(jobenv, doc["receipt_id"]))["result"]
    assert result["truncated"] is True and result["truncation"] == doc["truncation"]
    assert home_pids(jobenv.home) == []


def test_a_600_mb_output_file_is_streamed_to_disk(jobenv: JobEnv, tmp_path: Path) -> None:
    size = 600 * MIB
    cmd = [
        "sh",
        "-c",
        "dd if=/dev/zero of=$AVM_OUT/big bs=1M count=600 2>/dev/null; echo -n end >> $AVM_OUT/big",
    ]
    limits = {"output_bytes": 640 * MIB}
    spec = jobenv.spec("big", id="big", command=cmd, outputs=["big"], memory=1600, vcpus=2, limits=limits)
    out, rss = run_measured(jobenv, tmp_path, spec)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert rss < RUNNER_RSS_BOUND_KIB, rss
    big = Path(doc["output_dir"]) / "big"
    assert big.stat().st_size == size + 3 and doc["truncated"] is False
    with open(big, "rb") as fh:
        fh.seek(size - 4)
        assert fh.read() == b"\0\0\0\0end"
    assert home_pids(jobenv.home) == []


def _receipt(env: JobEnv, receipt_id: str) -> str:
    from tests.plugins.vms import run_avm

    out = run_avm(env.home, "--json", "receipts", "show", receipt_id)
    doc = json.loads(out.stdout)
    return json.dumps(doc.get("statement", doc)["predicate"])


PUMP = f"""
import os, subprocess, sys
from pathlib import Path
from controlplane.jobs.runtime import Launch
from controlplane.jobs.runtime.qemu import _Pump
longest = [0]
def stream(line):
    longest[0] = max(longest[0], len(line))
launch = Launch(job_id="p", marker="p", workdir=Path("."), kernel=Path("k"), initramfs=Path("i"),
                vcpus=1, memory_mib=64, timeout_s=1, stream=stream)
proc = subprocess.Popen(["head", "-c", sys.argv[1], "/dev/zero"], stdout=subprocess.PIPE)
pump = _Pump(launch)
with open(sys.argv[2], "wb") as log:
    pump.run(proc.stdout, log)
proc.wait()
print(pump.seen, longest[0], {HWM})
"""


def test_the_console_pump_is_bounded_for_a_flood_without_newlines(tmp_path: Path) -> None:
    flood = 512 * MIB
    log = tmp_path / "console.log"
    out = subprocess.run([sys.executable, "-c", PUMP, str(flood), str(log)], capture_output=True,
                         text=True, timeout=600, check=True)  # fmt: skip
    seen, longest, rss = (int(x) for x in out.stdout.split())
    assert seen == flood and log.stat().st_size == CONSOLE_LOG_MAX
    assert longest == 4096  # streamed lines are cut, never accumulated
    assert rss < 64 * 1024, rss


# --- the result frame, on real files ----------------------------------------------------------------


def frame(path: Path, secret: str, members: dict[str, bytes], *, after: bytes = b"", head: str = "") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    head = head or f"AVM-RESULT-1 {secret}\n"
    path.write_bytes(head.encode() + buf.getvalue() + after + f"AVM-RESULT-END {secret}\n".encode())
    return path


GOOD = {"rc": b"0\n", "stdout": b"hi\n", "stdout.rest": b"0\n", "stderr": b"", "stderr.rest": b"0\n",
        "netdevs": b"lo\n", "mounts": b"rootfs / rootfs rw,nosuid,nodev 0 0\n"}  # fmt: skip
SECRET = "a" * 32
FRAMES = [
    # (case, members, extra bytes after the archive, header, expected code)
    ("wrong-secret", GOOD, b"", f"AVM-RESULT-1 {'b' * 32}\n", "job-result-unframed"),
    ("no-frame", GOOD, b"", "rc\n", "job-result-unframed"),
    ("second-archive", GOOD, b"\0" * 512 + b"x" * 512, "", "job-result-extra-data"),
    ("unexpected-member", {**GOOD, "etc/passwd": b"x"}, b"", "", "job-result-unexpected"),
    ("stdout-over-limit", {**GOOD, "stdout": b"x" * 2048}, b"", "", "job-result-unexpected"),
    ("no-rc", {k: v for k, v in GOOD.items() if k != "rc"}, b"", "", "job-no-result"),
]


@pytest.mark.parametrize(("case", "members", "after", "head", "code"), FRAMES, ids=[f[0] for f in FRAMES])
def test_only_the_frame_of_this_run_is_accepted(
    tmp_path: Path, case: str, members: dict[str, bytes], after: bytes, head: str, code: str
) -> None:
    path = frame(tmp_path / "result.tar", SECRET, members, after=after, head=head)
    with pytest.raises(AvmError) as exc:
        jobresult.parse(path, SECRET, 1024, 1024)
    assert exc.value.code == code


def test_a_good_frame_parses_and_an_unfinished_one_is_no_result(tmp_path: Path) -> None:
    path = frame(tmp_path / "result.tar", SECRET, {**GOOD, "stdout.rest": b"5000\n"})
    res = jobresult.parse(path, SECRET, 1024, 1024)
    assert (res.rc, res.stdout, res.netdevs) == (0, "hi\n", ["lo"])
    assert res.truncated == [{"name": "stdout", "truncated": True, "limit": 1024, "bytes_seen": 5003}]
    path.write_bytes(path.read_bytes()[:-10])  # the guest stopped while writing
    with pytest.raises(AvmError) as exc:
        jobresult.parse(path, SECRET, 1024, 1024)
    assert exc.value.code == "job-no-result"


def test_console_logs_are_kept_per_run_under_a_retention_rule(tmp_path: Path) -> None:
    home = Home(tmp_path / "avm").ensure()
    src = tmp_path / "console.log"
    src.write_bytes(b"boot\n")
    for i in range(jobfiles.KEEP_LOGS + 3):
        kept, checks = jobfiles.keep_console_log(home, "job", f"job+{i:08x}", src)
        assert kept is not None
        os.utime(kept, (1000 + i, 1000 + i))
    names = sorted(p.name for p in jobfiles.logs_dir(home).iterdir())
    assert names == [f"job+{i:08x}.console.log" for i in range(3, jobfiles.KEEP_LOGS + 3)]
    assert checks == [("console-log-retained", True, "5 log(s) of job kept (max 5), each <= 4194304 B")]
    # a log over the cap makes the check fail
    (jobfiles.logs_dir(home) / "job+ffffffff.console.log").write_bytes(b"x" * (CONSOLE_LOG_MAX + 1))
    _, checks = jobfiles.keep_console_log(home, "job", "job+00000000", None)
    assert checks[0][1] is False and "over the cap" in checks[0][2]
