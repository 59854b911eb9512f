"""Job leftovers: find them by label, remove them, and check that nothing of a job remains.

Every job gets a private work dir ``<home>/run/jobs/avmjob+<id>+<nonce>`` whose name is also the
QEMU ``-name`` marker, so a process, a work dir and a job network all carry the same label. The
runner records its pid there; ``gc`` removes only leftovers whose runner is gone.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path

from controlplane.evidence.step import Check
from controlplane.home import Home
from controlplane.jobs.egress import network as egress
from controlplane.vm import procs

PREFIX = "avmjob+"


def jobs_dir(home: Home) -> Path:
    return home.run / "jobs"


def label(job_id: str, nonce: str) -> str:
    return f"{PREFIX}{job_id}+{nonce}"


def job_id_of(workdir_name: str) -> str:
    return workdir_name[len(PREFIX) :].rsplit("+", 1)[0]


def egress_label(workdir_name: str) -> str:
    """The egress module's label for this run: unique per run, so gc removes only this run's network."""
    return "j" + workdir_name.rsplit("+", 1)[1]


def _runner_alive(workdir: Path) -> bool:
    try:
        pid = int((workdir / "runner.pid").read_text())
    except (OSError, ValueError):
        return False
    return procs.cmdline(pid) is not None and not procs._is_zombie(pid)


def remove(workdir: Path) -> list[str]:
    """Kill the job's processes, drop its network, delete its work dir. Returns what was removed."""
    removed = []
    marker = workdir.name
    pids = procs.pids_with_marker(marker)
    if pids:
        procs.signal_pids(pids, signal.SIGKILL)
        procs.wait_gone(pids, marker, 5.0)
        removed += [f"process {pid} ({marker})" for pid in pids]
    uplink = uplink_of(workdir).get("uplink_netns")
    with contextlib.suppress(Exception):
        if egress.leftovers(job_id_of(marker), egress_label(marker), uplink_netns=uplink):
            removed += [f"egress {x}" for x in egress.gc(egress_label(marker), uplink_netns=uplink)]
    if workdir.exists():
        shutil.rmtree(workdir, ignore_errors=True)
        removed.append(f"workdir {workdir}")
    return removed


def gc(home: Home, job_id: str | None = None) -> list[str]:
    """Remove leftovers of dead runners (all jobs, or one job id). Live runs are left alone."""
    removed: list[str] = []
    base = jobs_dir(home)
    for workdir in sorted(base.iterdir()) if base.is_dir() else []:
        if not workdir.name.startswith(PREFIX):
            continue
        if job_id is not None and job_id_of(workdir.name) != job_id:
            continue
        if _runner_alive(workdir):
            continue
        removed += remove(workdir)
    return removed


def uplink_of(workdir: Path) -> dict[str, str]:
    path = workdir / "uplink_netns"
    return {"uplink_netns": path.read_text()} if path.is_file() else {}


def checks(workdir: Path, job_id: str, pid: int | None, uplink: dict[str, str] | None = None) -> list[Check]:
    """(name, ok, detail) for everything a job could leave behind on this host."""
    marker = workdir.name
    left = procs.pids_with_marker(marker)
    out = [
        Check(
            "qemu-process-gone", not left and not procs.alive(pid, marker), f"pid {pid}; marker pids {left}"
        ),
        Check("workdir-removed", not workdir.exists(), str(workdir)),
    ]
    try:
        rest = egress.leftovers(job_id, egress_label(marker), uplink_netns=(uplink or {}).get("uplink_netns"))
        out.append(Check("egress-leftovers-none", not rest, ", ".join(rest) or "netns, tap, nft table: none"))
    except Exception as exc:  # a failed check is recorded, not hidden
        out.append(Check("egress-leftovers-none", False, f"check failed: {exc}"))
    return out
