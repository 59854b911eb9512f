"""The guest's shell scripts are package data with pinned bytes, and shellcheck passes on them.

The job guest's init, its output budget and the golden VM's initramfs ``/init`` moved out of
string literals into ``controlplane/guestscripts/*.sh``. The sha256 of what each module renders
was taken from the code before the move, so the move (and any later edit) cannot change what a
guest runs without changing a constant here. The initramfs cache key hashes ``INIT``: a change
there also rebuilds every cached golden initramfs.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from controlplane import guestscripts
from controlplane.jobs import guest as guestinit
from controlplane.jobs import probe as jobprobe
from controlplane.jobs.spec import JobSpec
from controlplane.vm import initramfs
from tests.plugins.require import require_tools

SCRIPTS = Path(guestscripts.__file__).parent
# sha256 of the rendered text, captured from the string literals before they became files
RENDERED: dict[str, tuple[str, Callable[[], str]]] = {
    "job_init": ("525d967bac74b233ab127f362f2c0769edc640fe204c90943ee1ab3a3eef9f2c", lambda: guestinit.INIT),
    "budget": ("fb7e131918a39070e32917affa487bc557751fbf81f307b8d2bccd9889db4f55", lambda: guestinit.BUDGET),
    "initramfs_init": (
        "ca8e68c328e720df391d2286f48ff9d9eba7ed1145276ad964082b0125e5ae27",
        lambda: initramfs.INIT,
    ),
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_the_rendered_script_has_the_bytes_of_the_literal_it_replaced(name: str) -> None:
    want, rendered = RENDERED[name]
    assert hashlib.sha256(rendered().encode()).hexdigest() == want


def test_the_modules_read_the_package_files() -> None:
    assert (SCRIPTS / "job_init.sh").read_text() == guestinit.INIT
    assert (SCRIPTS / "budget.sh").read_text() == guestinit.BUDGET
    template = (SCRIPTS / "initramfs_init.sh").read_text()
    assert template.count("@SEED@") == 1 and template.count("@PLACEHOLDER@") == 1
    filled = template.replace("@SEED@", "opt/avm/seed").replace("@PLACEHOLDER@", "opt/avm/placeholder")
    assert filled == initramfs.INIT
    assert "@SEED@" not in initramfs.INIT and "@PLACEHOLDER@" not in initramfs.INIT


def test_the_job_script_renders_as_before() -> None:
    script = guestinit.job_script(["echo", "a b", "$x"], {"K": "v 'q'"})
    assert hashlib.sha256(script.encode()).hexdigest() == (
        "168fa2bade6390ff07632638d165f6096fd88d4e5233eb883f4e9c0b940f8275"
    )


def _shellcheck(*paths: Path) -> subprocess.CompletedProcess[str]:
    """shellcheck as ``make lint`` runs it (the .shellcheckrc next to a script sets dash and the excuses)."""
    require_tools("shellcheck")
    return subprocess.run(
        ["shellcheck", "--format=gcc", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_shellcheck_passes_on_every_guest_script() -> None:
    files = sorted(SCRIPTS.glob("*.sh"))
    assert [f.name for f in files] == ["budget.sh", "initramfs_init.sh", "job_init.sh"]
    checked = _shellcheck(*files)
    assert (checked.returncode, checked.stdout) == (0, "")


def test_shellcheck_finds_a_defect_in_a_guest_script(tmp_path: Path) -> None:
    """The check above can fail: the same run over a copy with a bashism reports it (as dash)."""
    (tmp_path / ".shellcheckrc").write_bytes((SCRIPTS / ".shellcheckrc").read_bytes())
    bad = tmp_path / "bad.sh"
    bad.write_text(guestinit.BUDGET + '[ "$AVM_OUTPUT_LIMIT" == 0 ] && echo full\n')
    checked = _shellcheck(bad)
    assert checked.returncode == 1
    assert checked.stdout == f"{bad}:7:23: error: In dash, == in place of = is not supported. [SC3014]\n"


def test_shellcheck_passes_on_a_rendered_egress_probe_script(tmp_path: Path) -> None:
    """The probe script is generated per job (jobprobe.probe_script): a rendered one, checked."""
    spec = JobSpec.model_validate(
        {
            "id": "probe",
            "image": "local/probe@sha256:" + "a" * 64,
            "command": ["true"],
            "egress": {
                "allow": [
                    {"host": "10.0.2.2", "port": 8080},
                    {"host": "10.0.2.3", "port": 53, "proto": "udp"},
                ]
            },
        }
    )
    script = jobprobe.probe_script(
        jobprobe.probe_plan(spec, {"AVM_NET_GW": "10.0.2.2"}, [("192.0.2.9", 443)])
    )
    assert script.count("\n") == 1 + 2 * 12  # cd /, then two lines for each of the 12 probes
    (tmp_path / ".shellcheckrc").write_bytes((SCRIPTS / ".shellcheckrc").read_bytes())
    (tmp_path / "probe.sh").write_text(script)
    checked = _shellcheck(tmp_path / "probe.sh")
    assert (checked.returncode, checked.stdout) == (0, "")
