"""Tier-2 jobs against a hostile job and a hostile spec, with real microVMs (issue 12).

No data loss on the host (--out), an unforgeable result (a signed set-uid image), confined
inputs, exit codes that cannot be confused with avm's own, a timeout that holds after ``kill -9``
of the runner, deny-all egress evidence, and blobs re-verified while a cached rootfs exists.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from controlplane.image import sign as imagesign
from controlplane.jobs import guest as guestinit
from controlplane.jobs.oci import store as ocistore
from controlplane.jobs.runner import rootfs_cache
from tests.plugins.jobimages import PASSWORD, JobEnv, home_pids, minimal_kernel_available, setuid_image
from tests.plugins.vms import AVM, run_avm
from tests.test_jobs_egress import ALLOWED, world  # noqa: F401 - the world namespace fixture


def kernel() -> list[str]:
    return ["--guest-kernel", "minimal" if minimal_kernel_available() else "golden"]


def receipt(env: JobEnv, receipt_id: object) -> dict[str, Any]:
    out = run_avm(env.home, "--json", "receipts", "show", str(receipt_id))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    return dict(doc.get("statement", doc)["predicate"])


def nothing_left(env: JobEnv) -> None:
    assert home_pids(env.home) == []
    jobs = env.home.run / "jobs"
    assert not jobs.exists() or [p.name for p in jobs.iterdir() if p.is_dir()] == []


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- data on the host ---------------------------------------------------------------------------


def test_out_never_deletes_what_the_runner_did_not_create(jobenv: JobEnv) -> None:
    mine = jobenv.workdir / "my-home-like-dir"
    (mine / "docs").mkdir(parents=True)
    (mine / "docs" / "thesis.txt").write_text("years of work\n")
    (mine / ".bashrc").write_text("alias ll='ls -l'\n")
    before = tree(mine)
    cmd = ["sh", "-c", "mkdir -p $AVM_OUT/sub && echo r > $AVM_OUT/sub/r.txt"]
    spec = jobenv.spec("out-keep", id="out-keep", command=cmd, outputs=["sub"])
    refused = run_avm(jobenv.home, "--json", "job", "run", str(spec), "--out", str(mine), *kernel())
    assert refused.returncode == 64, refused.stdout
    err = json.loads(refused.stdout)["error"]
    assert err["code"] == "job-out-not-empty" and err["details"]["actual"] == [".bashrc", "docs"]
    assert tree(mine) == before  # nothing written, nothing deleted
    nothing_left(jobenv)
    # an existing empty directory is claimed and filled; the job had no NIC, and says so
    empty = jobenv.workdir / "empty-out"
    empty.mkdir()
    ok = run_avm(jobenv.home, "--json", "job", "run", str(spec), "--out", str(empty), *kernel())
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert tree(empty) == {"sub/r.txt": b"r\n"}
    checks = {c["name"]: c for c in receipt(jobenv, doc["receipt_id"])["checks"]}
    assert checks["egress-no-nic-qemu-argv"]["ok"], checks
    assert checks["egress-no-nic-in-guest"]["ok"] and checks["egress-no-nic-in-guest"]["detail"] == (
        "guest links: ['lo']"
    )
    # the same --out again: it is not empty any more, so the first run's outputs stay as they are
    again = run_avm(jobenv.home, "--json", "job", "run", str(spec), "--out", str(empty), *kernel())
    assert again.returncode == 64 and json.loads(again.stdout)["error"]["code"] == "job-out-not-empty"
    assert tree(empty) == {"sub/r.txt": b"r\n"}
    nothing_left(jobenv)


def test_two_concurrent_runs_of_one_id_never_share_a_path(jobenv: JobEnv) -> None:
    cmd = ["sh", "-c", 'mkdir -p $AVM_OUT/o && echo "$RUN" > $AVM_OUT/o/who && echo "run $RUN"']
    specs = [
        jobenv.spec(f"twin-{n}", id="twin", command=cmd, outputs=["o"], env={"RUN": n}) for n in ("a", "b")
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outs = list(
            pool.map(lambda s: run_avm(jobenv.home, "--json", "job", "run", str(s), *kernel()), specs)
        )
    docs = [json.loads(o.stdout) for o in outs]
    assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]
    dirs = [Path(d["output_dir"]) for d in docs]
    logs = [Path(d["console_log"]) for d in docs]
    assert dirs[0] != dirs[1] and logs[0] != logs[1]
    assert [(d / "o" / "who").read_text() for d in dirs] == ["a\n", "b\n"]
    assert ["run a" in log.read_text() for log in logs] == [True, False]
    assert ["run b" in log.read_text() for log in logs] == [False, True]
    # one --out for two concurrent runs: exactly one claims it, the other is refused before boot
    shared = jobenv.workdir / "shared-out"
    with ThreadPoolExecutor(max_workers=2) as pool:
        argv = ["--json", "job", "run"]
        outs = list(
            pool.map(lambda s: run_avm(jobenv.home, *argv, str(s), "--out", str(shared), *kernel()), specs)
        )
    assert sorted(o.returncode for o in outs) == [0, 64], [o.stdout for o in outs]
    winner = next(json.loads(o.stdout) for o in outs if o.returncode == 0)
    assert tree(shared) == {"o/who": (winner["stdout"].split()[1] + "\n").encode()}
    nothing_left(jobenv)


# --- the result cannot be forged ----------------------------------------------------------------


def test_a_setuid_root_image_cannot_forge_its_result(jobenv: JobEnv) -> None:
    ref = setuid_image(jobenv.home, jobenv.workdir / "hostile", jobenv.key.read_bytes())
    spec = jobenv.spec("setuid", id="setuid", image=ref, command=["/bin/getroot"])
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec), *kernel())
    assert out.returncode == 4, (out.stdout, out.stderr)
    doc = json.loads(out.stdout)
    assert doc["status"] == "failed" and doc["exit_code"] == 7
    assert "getroot: setuid(0)=-1 uid=65534 euid=65534\n" in doc["stdout"]
    assert "getroot: secret No such file or directory\n" in doc["stdout"]  # init removed it first
    assert "WROTE" not in doc["stdout"]
    predicate = receipt(jobenv, doc["receipt_id"])
    assert predicate["result"]["exit_code"] == 7 and predicate["result"]["status"] == "failed"
    assert predicate["observations"]["setid_bits_stripped"] == ["bin/getroot"]
    checks = {c["name"]: c for c in predicate["checks"]}
    assert checks["result-framed"]["ok"] and checks["guest-root-nosuid"]["ok"], checks
    assert any("does not prove" in n or "not that" in n for n in predicate["non_claims"])
    listed = run_avm(jobenv.home, "receipts", "list")
    line = next(ln for ln in listed.stdout.splitlines() if ln.split()[0] == doc["receipt_id"])
    assert line.split()[3] == "failed", line
    nothing_left(jobenv)


# --- inputs are confined ------------------------------------------------------------------------


INPUT_CASES = [
    # (case, how the spec names the input, expected exit, error code)
    ("absolute", "/etc/shadow", 64, "jobspec-invalid"),
    ("dotdot", "../../etc/shadow", 64, "jobspec-invalid"),
    ("symlink-out", "link-out", 3, "job-input-outside"),
    ("signing-key", "avm/keys/receipt-signing.key", 3, "job-input-in-avm-home"),
    ("fifo", "a-fifo", 3, "job-input-not-regular"),
    ("device", "a-device", 3, "job-input-not-regular"),
    ("root-only-as-sudo-user", "root-only.txt", 3, "job-input-unreadable"),
]


@pytest.mark.parametrize(("case", "src", "rc", "code"), INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_inputs_stay_inside_the_spec_directory(
    jobenv: JobEnv, case: str, src: str, rc: int, code: str
) -> None:
    base = jobenv.workdir
    if not (base / "link-out").is_symlink():
        (base / "link-out").symlink_to("/etc/shadow")
        os.mkfifo(base / "a-fifo")
        os.mknod(base / "a-device", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero, inside the dir
        (base / "root-only.txt").write_text("root only\n")
        os.chmod(base / "root-only.txt", 0o600)
    spec = jobenv.spec(f"in-{case}", id=f"in-{case}", command=["true"], inputs=[{"src": src, "dest": "x"}])
    env = {"SUDO_UID": "65534", "SUDO_GID": "65534"} if case == "root-only-as-sudo-user" else None
    before = sorted(p.name for p in jobenv.home.root.iterdir())
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec), *kernel(), env=env)
    assert out.returncode == rc, (out.stdout, out.stderr)
    assert json.loads(out.stdout)["error"]["code"] == code
    assert sorted(p.name for p in jobenv.home.root.iterdir()) == before
    nothing_left(jobenv)


# --- exit codes and status ----------------------------------------------------------------------


@pytest.mark.parametrize("job_rc", [3, 64, 124])
def test_a_job_exit_code_never_looks_like_avms_own(jobenv: JobEnv, job_rc: int) -> None:
    spec = jobenv.spec(f"rc{job_rc}", id=f"rc-{job_rc}", command=["sh", "-c", f"exit {job_rc}"])
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec), *kernel())
    assert out.returncode == 4, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["status"], doc["exit_code"], doc["avm_exit_code"]) == ("failed", job_rc, 4)
    assert receipt(jobenv, doc["receipt_id"])["result"]["exit_code"] == job_rc
    nothing_left(jobenv)


def test_receipts_list_shows_a_timed_out_job_as_timeout(jobenv: JobEnv) -> None:
    spec = jobenv.spec("slow", id="slow", command=["sleep", "600"], timeout=3)
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec), *kernel())
    assert out.returncode == 124, out.stderr
    rid = json.loads(out.stdout)["receipt_id"]
    rows = json.loads(run_avm(jobenv.home, "--json", "receipts", "list").stdout)["receipts"]
    assert next(r for r in rows if str(r["seq"]) == rid)["status"] == "timeout"
    nothing_left(jobenv)


def test_nul_bytes_in_argv_or_env_are_refused(jobenv: JobEnv) -> None:
    for name, fields in (("argv", {"command": ["echo", "a\x00b"]}), ("env", {"env": {"K": "v\x00w"}})):
        doc = {"id": f"nul-{name}", "command": ["true"], **fields}
        out = run_avm(jobenv.home, "--json", "job", "run", str(jobenv.spec(f"nul-{name}", **doc)))
        assert out.returncode == 64, out.stdout
        err = json.loads(out.stdout)["error"]
        assert err["code"] == "jobspec-invalid" and "NUL byte" in err["message"], err
    nothing_left(jobenv)


def test_an_allowlist_may_not_open_more_addresses_than_the_tier_allows(jobenv: JobEnv) -> None:
    # 200 enforceable /8s (127/8 loopback and 169/8, which holds the metadata range, are refused at parse)
    allow = [{"host": f"{n}.0.0.0/8", "port": 443} for n in range(11, 213) if n not in (127, 169)]
    spec = jobenv.spec("wide", id="wide", command=["true"], egress={"allow": allow})
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec))
    assert out.returncode == 3, out.stdout
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "tier-controls-missing"
    assert err["details"]["job wide"]["reasons"]["default-deny-egress"] == (
        f"the allowlist opens {200 * 2**24} addresses, at most 65536 at L1"
    )
    nothing_left(jobenv)


# --- blobs are verified on every use ------------------------------------------------------------


def test_a_corrupted_layer_blob_is_noticed_while_a_cached_rootfs_exists(jobenv: JobEnv) -> None:
    files = {"corrupt-me": jobenv.workdir / "data.txt"}
    image = ocistore.build_job_image(jobenv.home, "avm/corrupt", files, busybox=Path("/bin/busybox"))
    imagesign.sign_image(jobenv.home, image.name, image.digest, jobenv.key.read_bytes(), PASSWORD)
    store = ocistore.store_dir(jobenv.home)
    cpio, hit, _ = guestinit.image_cpio(rootfs_cache(jobenv.home), store, image)
    assert not hit and cpio.is_file()  # the cache exists now
    layer = store / "blobs" / "sha256" / image.layers[0]["digest"].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    spec = jobenv.spec("corrupt", id="corrupt", image=image.ref, command=["true"])
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec), *kernel())
    assert out.returncode == 3, out.stdout
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "oci-blob-corrupt" and err["details"]["expected"] == image.layers[0]["digest"]
    nothing_left(jobenv)


# --- the hard timeout holds without the runner ---------------------------------------------------


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


def test_kill_9_of_the_runner_takes_the_guest_and_its_network_without_gc(
    jobenv: JobEnv,
    world: tuple[str, Path],  # noqa: F811
) -> None:
    timeout = 10
    allow = {"allow": [{"host": ALLOWED, "port": 8080}]}
    spec = jobenv.spec("k9", id="k9", command=["sleep", "600"], timeout=timeout, egress=allow)
    argv = [sys.executable, "-c", KILLED_RUNNER, str(jobenv.home.root), str(spec), kernel()[1], world[0]]
    runner = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not home_pids(jobenv.home, "k9+") and time.monotonic() < deadline:
        time.sleep(0.1)
    qemu = home_pids(jobenv.home, "k9+")
    assert qemu, "the guest never started"
    netns = [n for n in _netns() if n.endswith("--k9")]
    assert len(netns) == 1, netns  # the job's allowlisted network is up
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    killed = time.monotonic()
    while (home_pids(jobenv.home) or _netns_of("k9")) and time.monotonic() < killed + timeout + 5:
        time.sleep(0.1)
    assert home_pids(jobenv.home) == [], "QEMU outlived its runner past timeout + 5 s"
    assert _netns_of("k9") == [], "the job network outlived its guest"
    links = subprocess.run(["ip", "-n", world[0], "-o", "link"], capture_output=True, text=True, check=True)
    assert ":k9" not in links.stdout and "avm:" not in links.stdout
    assert [p.name for p in (jobenv.home.run / "jobs").iterdir() if p.is_dir()] == []
    # nothing was left for gc to do
    gc = run_avm(jobenv.home, "--json", "job", "gc")
    assert gc.returncode == 0 and json.loads(gc.stdout)["removed"] == []


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()]


def _netns_of(job_id: str) -> list[str]:
    return [n for n in _netns() if n.startswith("avm-j") and n.endswith(f"--{job_id}")]


def test_the_watchdog_never_carries_the_run_marker(jobenv: JobEnv) -> None:
    """The watchdog's command line never carries the run's marker (the checks look for it)."""
    spec = jobenv.spec("wd", id="wd", command=["sleep", "600"], timeout=120)
    runner = subprocess.Popen([*AVM, "--home", str(jobenv.home.root), "job", "run", str(spec), *kernel()],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not home_pids(jobenv.home, "wd+") and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = home_pids(jobenv.home, "wd+")
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0] for p in pids]
    assert [os.path.basename(c) for c in cmdlines] == [b"qemu-system-x86_64"], cmdlines
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) == 130
    nothing_left(jobenv)
