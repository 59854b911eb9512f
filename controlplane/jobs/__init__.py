"""Tier-2: ephemeral microVM jobs with default-deny egress, a hard timeout and verified teardown.

* ``runner``: ``avm job run SPEC`` end to end (gate, boot, collect, tear down, receipt).
* ``spec``: the job spec, validated once at the edge.
* ``result`` / ``files`` / ``watch`` / ``teardown``: the framed result, the host files of a run,
  the watchdog that outlives the runner, and the check that nothing is left.
* ``guest`` / ``kernel`` / ``probe``: the guest's init and initramfs, the guest kernel, and the
  egress probe run from inside a real guest.
* ``oci/``: the digest-pinned, signed image store; ``runtime/``: QEMU (local or remote) and Kata;
  ``egress/``: the job-private network and its nftables rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane._internal.lazy import exports

if TYPE_CHECKING:
    from controlplane.jobs.runner import JobResult, run_job
    from controlplane.jobs.spec import JobSpec, load_jobspec

__all__ = ["JobResult", "JobSpec", "load_jobspec", "run_job"]
__getattr__ = exports(
    __name__, {"JobSpec": "spec", "load_jobspec": "spec", "run_job": "runner", "JobResult": "runner"}
)
