"""The ``gcp`` backend: a GCE golden VM from the Pulumi program in ``gcp_program``, driven
through Pulumi's Automation API (inline program, one stack per VM), reached by an IAP tunnel.

Each VM is one stack named by its marker, in a Pulumi workspace under the VM's state dir; the
state itself lives wherever the operator's ``PULUMI_BACKEND_URL`` (or ``pulumi login``) points.
SSH: ``gcloud compute start-iap-tunnel`` forwards 127.0.0.1:<ssh_port> to the instance's port 22
(the instance has no external IP); the tunnel's command line carries the marker (the instance
is named by it), so teardown can find it. pulumi and pulumi-gcp (extra ``agent-vm[gcp]``) are
imported only inside these functions. Operator settings come from the environment; see
``docs/gcp.md``. The Automation API needs the Pulumi CLI on PATH: ``preflight`` refuses without
it, before anything is created.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from controlplane.errors import OperationalError, UsageError
from controlplane.evidence.step import Check
from controlplane.vm import procs
from controlplane.vm.base import Booted, BootRequest, VmRecord, VmSpec

PROJECT_NAME = "avm"
ENV = {
    "project": "AVM_GCP_PROJECT",
    "image": "AVM_GCP_IMAGE",  # gs://BUCKET/OBJECT (a disk.raw in a .tar.gz)
    "zone": "AVM_GCP_ZONE",
    "machine_type": "AVM_GCP_MACHINE_TYPE",
    "egress_allow": "AVM_GCP_EGRESS_ALLOW",  # JSON: [{"cidr": "...", "ports": [443]}]
}
CLI_HINT = (
    "install the Pulumi CLI (`curl -fsSL https://get.pulumi.com | sh`, then add ~/.pulumi/bin to PATH; "
    "or see https://www.pulumi.com/docs/iac/download-install/), choose a state backend "
    "(`pulumi login gs://BUCKET` or set PULUMI_BACKEND_URL), and see docs/gcp.md"
)


def require_tools() -> None:
    """Raises ``OperationalError``: ``gcp-extra-missing``, ``pulumi-cli-missing``, ``gcloud-missing``."""
    try:
        import pulumi.automation  # noqa: F401
        import pulumi_gcp  # noqa: F401
    except ImportError as exc:
        raise OperationalError(
            "gcp-extra-missing",
            f"the gcp backend needs pulumi and pulumi-gcp: {exc}",
            hint="pip install 'agent-vm[gcp]'",
        ) from exc
    if shutil.which("pulumi") is None:
        raise OperationalError(
            "pulumi-cli-missing",
            "the gcp backend drives the Pulumi CLI through the Automation API, "
            "and no `pulumi` executable is on PATH; nothing was created",
            hint=CLI_HINT,
            details={"expected": "pulumi on PATH", "actual": os.environ.get("PATH", "")},
        )
    if shutil.which("gcloud") is None:
        raise OperationalError(
            "gcloud-missing",
            "the gcp backend reaches the VM through an IAP tunnel, and `gcloud` is not on PATH",
            hint="install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and "
            "`gcloud auth login`",
        )


def machine_type(spec: VmSpec) -> str:
    """``$AVM_GCP_MACHINE_TYPE``, else an N2 custom type of the spec's shape.

    Raises ``UsageError('gcp-machine-shape')`` when N2 cannot have that shape (even vCPUs,
    0.5-8 GiB per vCPU, memory a multiple of 256 MiB).
    """
    if os.environ.get(ENV["machine_type"]):
        return os.environ[ENV["machine_type"]]
    v, m = spec.vcpus, spec.memory_mib
    if v % 2 or m % 256 or not 512 * v <= m <= 8192 * v:
        raise UsageError(
            "gcp-machine-shape",
            f"N2 has no custom machine with {v} vCPU and {m} MiB",
            hint=f"use an even vCPU count and 0.5-8 GiB per vCPU, or set {ENV['machine_type']}",
            details={"vcpus": v, "memory_mib": m},
        )
    return f"n2-custom-{v}-{m}"


def settings_config(spec: VmSpec, marker: str, seed: bytes) -> dict[str, tuple[str, bool]]:
    """The stack config (key -> (value, secret)) from the environment.

    Raises ``UsageError('gcp-config-missing')`` naming each unset variable, and
    ``UsageError('gcp-config-invalid')`` for a malformed image URL or egress list.
    """
    missing = [ENV[k] for k in ("project", "image") if not os.environ.get(ENV[k])]
    if missing:
        raise UsageError(
            "gcp-config-missing",
            f"the gcp backend needs {', '.join(missing)}",
            hint="see docs/gcp.md: AVM_GCP_PROJECT=my-project AVM_GCP_IMAGE=gs://bucket/golden.tar.gz",
            details={"missing": missing},
        )
    image = os.environ[ENV["image"]]
    bucket, _, obj = image.removeprefix("gs://").partition("/")
    egress = os.environ.get(ENV["egress_allow"], "[]")
    try:
        if not image.startswith("gs://") or not bucket or not obj:
            raise ValueError(f"{ENV['image']}={image!r} is not gs://BUCKET/OBJECT")
        json.loads(egress)
    except ValueError as exc:
        raise UsageError("gcp-config-invalid", str(exc), hint="see docs/gcp.md for the formats") from exc
    config = {
        "gcp:project": (os.environ[ENV["project"]], False),
        "avm:name": (marker, False),
        "avm:imageBucket": (bucket, False),
        "avm:imageObject": (obj, False),
        "avm:machineType": (machine_type(spec), False),
        "avm:egressAllow": (egress, False),
        # the per-VM host key is in it: encrypted in the stack's config and state
        "avm:seed": (base64.b64encode(seed).decode(), True),
    }
    if os.environ.get(ENV["zone"]):
        config["avm:zone"] = (os.environ[ENV["zone"]], False)
    return config


def open_stack(stack_name: str, work_dir: Path) -> Any:
    """The VM's stack (created or selected) with the inline program."""
    from pulumi import automation as auto

    from controlplane.vm.gcp_program import program

    work_dir.mkdir(mode=0o700, exist_ok=True)
    opts = auto.LocalWorkspaceOptions(
        work_dir=str(work_dir),
        project_settings=auto.ProjectSettings(name=PROJECT_NAME, runtime="python"),
    )
    return auto.create_or_select_stack(stack_name, PROJECT_NAME, program, opts=opts)


def _pulumi_error(code: str, what: str, exc: Exception) -> OperationalError:
    return OperationalError(
        code,
        f"pulumi {what} failed: {str(exc)[-800:]}",
        hint="check GCP credentials (`gcloud auth application-default login`), quotas and the stack's "
        "state (`pulumi stack --show-urns`)",
    )


class GcpBackend:
    name = "gcp"
    host_network = False

    def preflight(self, spec: VmSpec) -> None:
        require_tools()
        settings_config(spec, "avm-vm-preflight", b"")

    def boot(self, request: BootRequest) -> Booted:
        """``pulumi up`` the VM's stack, then open the IAP tunnel. On failure the stack is
        destroyed; raises ``OperationalError('pulumi-up-failed')``."""
        from pulumi import automation as auto

        config = settings_config(request.spec, request.marker, request.seed.tar())
        try:
            stack = open_stack(request.marker, request.state_dir / "pulumi")
            stack.set_all_config({k: auto.ConfigValue(value=v, secret=s) for k, (v, s) in config.items()})
            outputs = stack.up(color="never").outputs
        except Exception as exc:  # the Automation API raises CommandError and its subclasses
            self._destroy(request.marker, request.state_dir)
            raise _pulumi_error("pulumi-up-failed", "up", exc) from exc
        zone, project = outputs["zone"].value, config["gcp:project"][0]
        argv = ["gcloud", "compute", "start-iap-tunnel", request.marker, "22"]
        argv += [f"--local-host-port=127.0.0.1:{request.ssh_port}", f"--zone={zone}", f"--project={project}"]
        with (request.state_dir / "iap-tunnel.log").open("ab") as log:
            tunnel = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return Booted(
            pid=tunnel.pid,
            accelerator="cloud",
            ssh_port=request.ssh_port,
            observations={
                "stack": request.marker,
                "project": project,
                "zone": zone,
                "instance": outputs["instance_name"].value,
                "internal_ip": outputs["internal_ip"].value,
                "machine_type": config["avm:machineType"][0],
            },
        )

    def alive(self, record: VmRecord) -> bool:
        """The IAP tunnel runs and GCE reports the instance RUNNING."""
        if not procs.alive(record.pid, record.marker):
            return False
        obs = record.observations
        argv = ["gcloud", "compute", "instances", "describe", record.marker, "--format=value(status)"]
        argv += [f"--zone={obs.get('zone')}", f"--project={obs.get('project')}"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.stdout.strip() == "RUNNING"

    def shutdown(self, record: VmRecord, *, grace_s: float) -> list[Check]:
        tunnels = procs.pids_with_marker(record.marker)
        procs.signal_pids(tunnels, signal.SIGTERM)
        if not procs.wait_gone(tunnels, record.marker, grace_s):
            procs.signal_pids(tunnels, signal.SIGKILL)
        destroyed, detail = self._destroy(record.marker, Path(record.state_dir))
        return [
            Check("iap-tunnel-stopped", procs.wait_gone(tunnels, record.marker, 5.0), f"pids {tunnels}"),
            Check("stack-destroyed", destroyed, detail),
        ]

    def leftovers(self, record: VmRecord) -> list[Check]:
        from pulumi import automation as auto

        left: list[str] = ["unknown: the stack could not be read"]
        try:
            stack = open_stack(record.marker, Path(record.state_dir) / "pulumi")
            resources = stack.export_stack().deployment.get("resources") or []
            left = [r["urn"] for r in resources if not r["type"].startswith("pulumi:")]
            if not left:
                stack.workspace.remove_stack(record.marker)
        except (auto.errors.CommandError, OSError) as exc:
            left = [f"unknown: {exc}"]
        by_marker = procs.pids_with_marker(record.marker)
        return [
            Check("no-cloud-resources-left", not left, "; ".join(left) or "stack empty and removed"),
            Check("no-process-with-marker", not by_marker, f"marker {record.marker}: {by_marker or 'none'}"),
        ]

    def _destroy(self, stack_name: str, state_dir: Path) -> tuple[bool, str]:
        try:
            open_stack(stack_name, state_dir / "pulumi").destroy(color="never")
        except Exception as exc:
            return False, str(_pulumi_error("pulumi-destroy-failed", "destroy", exc))
        return True, "pulumi destroy deleted the instance, image, firewall, network and service account"
