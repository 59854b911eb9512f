"""Tier-2 jobs end to end through the real CLI: real QEMU guests booted from the golden kernel.

What a user notices: the job's stdout and exit code, outputs on the host, 124 on timeout, exit 3
or 64 with nothing started for a bad image or spec, and a receipt whose teardown checks pass.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from controlplane.image import sign as imagesign
from controlplane.jobs.oci import store as ocistore
from tests.plugins.jobimages import PASSWORD, JobEnv, home_pids
from tests.plugins.vms import AVM, run_avm


def nothing_left(env: JobEnv) -> None:
    assert home_pids(env.home) == []  # only this home's runs: other avm runs may share the machine
    jobs = env.home.run / "jobs"
    assert not jobs.exists() or [p.name for p in jobs.iterdir() if p.is_dir()] == []


def test_hello_job_streams_output_returns_outputs_and_exit_0(jobenv: JobEnv) -> None:
    spec = jobenv.spec(
        "hello",
        id="hello",
        command=["/bin/sh", "/hello.sh"],
        env={"GREETING": "hi there; $(rm -rf /)"},
        inputs=[{"src": "data.txt", "dest": "in/data.txt"}],
        outputs=["sub"],
    )
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec), "--out", str(jobenv.workdir / "out-hello"))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "ok" and doc["exit_code"] == 0
    assert doc["stdout"] == "hello-from-job\ngreeting=hi there; $(rm -rf /)\ninput-data\n"
    assert doc["stderr"] == "err-line\n"
    assert (jobenv.workdir / "out-hello" / "sub" / "r.txt").read_text() == "result-file\n"
    names = {c["name"]: c["ok"] for c in doc["checks"]}
    assert names["qemu-process-gone"] and names["workdir-removed"], doc["checks"]
    nothing_left(jobenv)
    # live streaming: the human form prints console lines to stderr as they arrive
    human = run_avm(jobenv.home, "job", "run", str(spec))
    assert human.returncode == 0 and "[hello] hello-from-job" in human.stderr
    assert human.stdout.startswith("hello-from-job\n")


def test_nonzero_exit_code_propagates_and_the_job_cannot_forge_the_result(jobenv: JobEnv) -> None:
    out = run_avm(
        jobenv.home,
        "--json",
        "job",
        "run",
        str(jobenv.spec("exit", id="exit42", command=["sh", "-c", "exit 42"])),
    )
    assert out.returncode == 4, out.stderr  # avm's "the job failed"; the job's own code is reported
    assert json.loads(out.stdout)["status"] == "failed" and json.loads(out.stdout)["exit_code"] == 42
    forged = run_avm(
        jobenv.home,
        "--json",
        "job",
        "run",
        str(jobenv.spec("forge", id="forge", command=["/bin/sh", "/forge.sh"])),
    )
    doc = json.loads(forged.stdout)
    assert forged.returncode == 4 and doc["exit_code"] == 5, forged.stderr
    assert "WROTE" not in doc["stdout"] and "KILLED-INIT" not in doc["stdout"]
    assert "avm-init: job exit 0" in doc["stdout"]  # printed, and ignored: the console is not the channel
    nothing_left(jobenv)


def test_timeout_kills_the_vm_and_exits_124(jobenv: JobEnv) -> None:
    spec = jobenv.spec("sleep", id="sleeper", command=["sleep", "600"], timeout=4)
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec))
    assert out.returncode == 124, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "timeout" and doc["exit_code"] is None and doc["avm_exit_code"] == 124
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]
    nothing_left(jobenv)


def _other_key(env: JobEnv) -> bytes:
    from controlplane.release import cosign

    private, _ = cosign.generate_keypair(PASSWORD)
    return private


REFUSALS = [
    # (case, spec fields, expected exit, error code)
    ("unpinned", {"image": "avm/test-job:latest"}, 64, "jobspec-invalid"),
    ("bad-id", {"id": "Bad/ID"}, 64, "jobspec-invalid"),
    ("escaping-output", {"outputs": ["../../etc"]}, 64, "jobspec-invalid"),
    ("wrong-digest", {"image": "avm/test-job@sha256:" + "0" * 64}, 3, "image-digest-mismatch"),
    ("unsigned", "unsigned", 3, "image-signature-missing"),
    ("untrusted-signer", "untrusted", 3, "image-signature-invalid"),
    ("signature-of-other-image", "swapped", 3, "image-signature-digest-mismatch"),
    # L2 needs an approval bound to the job; none exists, so the tier gate refuses
    ("tier-needs-approval", {"risk_tier": "L2"}, 3, "tier-controls-missing"),
]


@pytest.mark.parametrize(("case", "fields", "rc", "code"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_image_or_spec_is_refused_before_boot(
    jobenv: JobEnv, case: str, fields: object, rc: int, code: str
) -> None:
    doc: dict[str, object] = {"id": f"ref-{case}", "command": ["true"]}
    if isinstance(fields, dict):
        doc.update(fields)
    else:
        files = {"hello.sh": jobenv.workdir / "hello.sh", "marker": jobenv.workdir / "data.txt"}
        files[f"case-{case}"] = jobenv.workdir / "data.txt"
        other = ocistore.build_job_image(jobenv.home, f"avm/{case}", files)
        doc["image"] = other.ref
        if fields == "untrusted":
            imagesign.sign_image(jobenv.home, other.name, other.digest, _other_key(jobenv), PASSWORD)
        elif fields == "swapped":  # a valid signature, but over another image's payload
            real = imagesign.signature_file(jobenv.home, jobenv.image.split("@")[1])
            imagesign.signature_file(jobenv.home, other.digest).write_bytes(real.read_bytes())
    spec = jobenv.spec(f"refuse-{case}", **doc)
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec))
    assert out.returncode == rc, (out.stdout, out.stderr)
    assert json.loads(out.stdout)["error"]["code"] == code
    nothing_left(jobenv)


def test_outputs_smuggled_as_symlinks_are_refused(jobenv: JobEnv) -> None:
    spec = jobenv.spec("escape", id="escape", command=["/bin/sh", "/escape.sh"], outputs=["x"])
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec), "--out", str(jobenv.workdir / "out-escape"))
    assert out.returncode == 3, out.stderr
    assert json.loads(out.stdout)["error"]["code"] == "job-output-unsafe"
    assert not (jobenv.workdir / "out-escape" / "x").exists()
    nothing_left(jobenv)


def test_kata_runtime_says_plainly_it_is_not_installed(jobenv: JobEnv) -> None:
    from controlplane.jobs.runtime import kata

    spec = jobenv.spec("kata", id="kata", command=["true"])
    out = run_avm(jobenv.home, "--json", "job", "run", str(spec), "--runtime", "kata")
    if not kata.missing():
        pytest.skip("Kata is installed here; this test covers hosts without it")
    assert out.returncode == 1
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "kata-unavailable" and err["details"]["missing"], err
    nothing_left(jobenv)


def test_image_cli_build_sign_and_import_roundtrip(jobenv: JobEnv, tmp_path: Path) -> None:
    built = run_avm(
        jobenv.home,
        "--json",
        "image",
        "build-job",
        "avm/cli",
        "--file",
        f"{jobenv.workdir / 'hello.sh'}:hello.sh",
    )
    assert built.returncode == 0, built.stderr
    ref = json.loads(built.stdout)["image"]
    again = run_avm(
        jobenv.home,
        "--json",
        "image",
        "build-job",
        "avm/cli",
        "--file",
        f"{jobenv.workdir / 'hello.sh'}:hello.sh",
    )
    assert json.loads(again.stdout)["image"] == ref  # deterministic
    signed = run_avm(
        jobenv.home,
        "image",
        "sign",
        ref,
        "--key",
        str(jobenv.key),
        env={"COSIGN_PASSWORD": PASSWORD.decode()},
    )
    assert signed.returncode == 0, signed.stderr
    # a tar of the store's OCI layout imports into a second home under the same digest
    layout = tmp_path / "layout.tar"
    subprocess.run(["tar", "-C", str(ocistore.store_dir(jobenv.home)), "-cf", str(layout), "."], check=True)
    from controlplane.home import Home

    other = Home(tmp_path / "other").ensure()
    imported = run_avm(other, "--json", "image", "import", str(layout))
    assert imported.returncode == 0, imported.stderr
    assert ref in json.loads(imported.stdout)["images"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signalled_runner_tears_down_before_it_exits(jobenv: JobEnv, sig: signal.Signals) -> None:
    spec = jobenv.spec(f"sig{sig.value}", id=f"sig-{sig.value}", command=["sleep", "600"], timeout=300)
    argv = [*AVM, "--home", str(jobenv.home.root), "job", "run", str(spec)]
    runner = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not home_pids(jobenv.home, f"sig-{sig.value}+") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert home_pids(jobenv.home, f"sig-{sig.value}+"), "the guest never started"
    runner.send_signal(sig)
    _, err = runner.communicate(timeout=30)
    assert runner.returncode == 130, err
    nothing_left(jobenv)  # no `avm job gc` needed: the runner's own teardown ran
