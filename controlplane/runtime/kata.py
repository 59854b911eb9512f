"""The ``kata`` Tier-2 runtime: containerd ``ctr run --runtime io.containerd.kata.v2``.

Only where Kata is installed: containerd must run, ``ctr`` must be on PATH and the shim
``containerd-shim-kata-v2`` must be resolvable (Kata also needs working KVM). Where any is
missing it says so and runs nothing; it never falls back to another runtime silently.
"""

from __future__ import annotations

import shutil

from controlplane.errors import OperationalError
from controlplane.runtime import Launch, Outcome

SHIM = "containerd-shim-kata-v2"
RUNTIME_NAME = "io.containerd.kata.v2"


def missing() -> list[str]:
    """What this host lacks for Kata jobs (empty when everything is there)."""
    out = [tool for tool in ("ctr", "containerd", SHIM) if shutil.which(tool) is None]
    return out


def ctr_argv(
    image_ref: str, container_id: str, argv: list[str], env: dict[str, str], address: str
) -> list[str]:
    """The ``ctr run`` command for a job (pure)."""
    envs = [a for k, v in sorted(env.items()) for a in ("--env", f"{k}={v}")]
    return ["ctr", "-a", address, "-n", "avm", "run", "--rm", "--runtime", RUNTIME_NAME, "--net-host=false",
            *envs, image_ref, container_id, *argv]  # fmt: skip


class KataRuntime:
    name = "kata"

    def leftovers(self, marker: str) -> list[str]:
        return []

    def run(self, launch: Launch) -> Outcome:
        """Raises ``OperationalError('kata-unavailable')`` naming what is missing on this host."""
        lacking = missing()
        if lacking:
            raise OperationalError(
                "kata-unavailable",
                f"the kata runtime cannot run here: {', '.join(lacking)} not installed",
                hint="install Kata Containers and containerd (Kata needs working KVM), or use --runtime qemu",
                details={"missing": lacking, "expected": ["ctr", "containerd", SHIM]},
            )
        raise OperationalError(
            "kata-unavailable",
            "Kata is installed, but this avm build does not yet import job images into containerd",
            hint="use --runtime qemu",
        )
