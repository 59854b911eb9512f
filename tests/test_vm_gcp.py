"""gcp backend: it refuses clearly, before creating anything, when the Pulumi CLI, gcloud or the
operator's settings are missing, and it classifies a failing ``pulumi`` run and leaves nothing.

What this does NOT prove: that a GCE VM comes up. No Pulumi CLI, provider plugin, GCP project
or credentials are reachable here; a real run is described in docs/gcp.md. The last test puts a
stand-in ``pulumi`` executable on PATH that always fails, to exercise only the error path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controlplane.errors import AvmError, OperationalError, UsageError
from controlplane.evidence import keys
from controlplane.home import Home
from controlplane.vm import lifecycle
from controlplane.vm.base import VmSpec
from tests.plugins.vms import run_avm

needs_gcp = pytest.mark.usefixtures("gcp_extra")


@dataclasses.dataclass(frozen=True)
class FakeImage:
    digest: str = "sha256:" + "0" * 64
    rootfs: Path = Path("/nonexistent")
    qcow2: Path = Path("/nonexistent/golden.qcow2")
    kernel: Path = Path("/nonexistent/vmlinuz")
    initrd: Path = Path("/nonexistent/initrd.img")
    cmdline: str = "console=ttyS0"


def bin_dir(tmp: Path, **scripts: str) -> Path:
    """A PATH directory holding only the given executables (name -> shell body)."""
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (d / name).write_text("#!/bin/sh\n" + body)
        (d / name).chmod(0o755)
    return d


def assert_nothing_created(home: Home, name: str) -> None:
    assert not lifecycle.state_dir(home, name).exists()
    assert not (home.inventory / f"{name}.json").exists()


def up_error(home: Home, name: str, **spec: object) -> AvmError:
    with pytest.raises(AvmError) as err:
        lifecycle.up(home, VmSpec(name=name, backend="gcp", **spec), FakeImage())  # type: ignore[arg-type]
    return err.value


@needs_gcp
def test_up_without_pulumi_cli_is_actionable_and_creates_nothing(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(bin_dir(tmp_path)))
    err = up_error(home, "g1")
    assert isinstance(err, OperationalError) and err.code == "pulumi-cli-missing"
    assert "get.pulumi.com" in err.hint and "docs/gcp.md" in err.hint
    assert_nothing_created(home, "g1")


@pytest.mark.slow
@needs_gcp
def test_cli_vm_up_backend_gcp_without_pulumi_cli(golden_home: Home, tmp_path: Path) -> None:
    """The operator's view: exit 1, the code and the hint on stderr, no traceback, nothing left."""
    out = run_avm(golden_home, "vm", "up", "g2", "--backend", "gcp", env={"PATH": str(bin_dir(tmp_path))})
    assert out.returncode == 1, out.stderr
    assert "pulumi-cli-missing" in out.stderr and "get.pulumi.com" in out.stderr
    assert "Traceback" not in out.stderr
    assert_nothing_created(golden_home, "g2")


@needs_gcp
def test_up_without_gcloud_or_settings_refuses_before_anything(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(bin_dir(tmp_path, pulumi="exit 1\n")))
    assert up_error(home, "g3").code == "gcloud-missing"
    monkeypatch.setenv("PATH", str(bin_dir(tmp_path, gcloud="exit 1\n")))
    for var in ("AVM_GCP_PROJECT", "AVM_GCP_IMAGE"):
        monkeypatch.delenv(var, raising=False)
    err = up_error(home, "g3")
    assert isinstance(err, UsageError) and err.code == "gcp-config-missing"
    assert err.details["missing"] == ["AVM_GCP_PROJECT", "AVM_GCP_IMAGE"]
    monkeypatch.setenv("AVM_GCP_PROJECT", "p")
    monkeypatch.setenv("AVM_GCP_IMAGE", "https://example.test/disk.tar.gz")
    assert up_error(home, "g3").code == "gcp-config-invalid"
    monkeypatch.setenv("AVM_GCP_IMAGE", "gs://bucket/disk.tar.gz")
    assert up_error(home, "g3", vcpus=3).code == "gcp-machine-shape"
    assert_nothing_created(home, "g3")


@pytest.mark.parametrize(
    ("vcpus", "memory", "env", "expected"),
    [
        (2, 1024, None, "n2-custom-2-1024"),
        (4, 16384, None, "n2-custom-4-16384"),
        (2, 1024, "n2-standard-8", "n2-standard-8"),
        (3, 2048, None, None),  # odd vCPUs
        (2, 20480, None, None),  # more than 8 GiB per vCPU
        (2, 1100, None, None),  # not a multiple of 256 MiB
    ],
)
def test_machine_type_follows_the_spec(
    vcpus: int, memory: int, env: str | None, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane.vm.gcp import machine_type

    if env:
        monkeypatch.setenv("AVM_GCP_MACHINE_TYPE", env)
    else:
        monkeypatch.delenv("AVM_GCP_MACHINE_TYPE", raising=False)
    spec = VmSpec(name="g4", backend="gcp", vcpus=vcpus, memory_mib=memory)
    if expected is None:
        with pytest.raises(UsageError, match="N2 has no custom machine"):
            machine_type(spec)
    else:
        assert machine_type(spec) == expected


@needs_gcp
def test_failing_pulumi_run_is_classified_and_leaves_nothing(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "pulumi-calls.log"
    fake = f'echo "$@" >> {log}\ncase "$1" in version) echo v3.272.0; exit 0;; esac\n'
    fake += 'echo "error: stand-in pulumi refuses everything" >&2\nexit 255\n'
    monkeypatch.setenv("PATH", str(bin_dir(tmp_path, pulumi=fake, gcloud="exit 1\n")))
    monkeypatch.setenv("AVM_GCP_PROJECT", "p")
    monkeypatch.setenv("AVM_GCP_IMAGE", "gs://bucket/disk.tar.gz")
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "test")
    keys.init(home)  # the failure happens inside a receipt step
    err = up_error(home, "g5")
    assert isinstance(err, OperationalError) and err.code == "pulumi-up-failed"
    assert "stand-in pulumi refuses everything" in err.message
    assert_nothing_created(home, "g5")
    calls = log.read_text()
    assert "stack" in calls, calls  # the Automation API drove the executable on PATH
