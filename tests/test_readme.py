"""The README's commands, as written: every one parses against the real CLI, the shipped job spec
pins the image its script builds, and the job commands run for real in a microVM.

The Tier-1 commands (image build, vm up, sign, promote, status, rollback) need an agent
repository with tagged commits and a booted golden VM: `make demo` runs exactly those; here they
are parsed with the real command tree so a renamed option or argument fails the suite."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
import yaml

from controlplane.cli import cli
from tests.plugins.golden import shared_image_store
from tests.plugins.jobimages import needs_job_tools

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
JOB_SPEC = ROOT / "examples" / "jobs" / "hello.yaml"
RUN_FOR_REAL = (
    "keys init",
    "keys release-init",
    "keys trust",
    "image build-job",
    "image sign",
    "job run",
    "receipts verify",
)


def readme_commands() -> list[list[str]]:
    """Every ``avm ...`` line of the README's sh blocks, comments dropped, split as a shell would."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("avm ")]
    return [shlex.split(line, comments=True) for line in lines]


def _unparsed(ctx: click.Context) -> list[str]:
    # what a group hands its subcommand (Group.invoke does the same); click 8.2 deprecates the
    # name but not the split, and click 9 will put everything in ctx.args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return [*getattr(ctx, "protected_args", []), *ctx.args]


def _parse(args: list[str]) -> list[str]:
    """Parse ``args`` down the real command tree without running anything; the command path."""
    ctx = cli.make_context("avm", list(args))
    path: list[str] = []
    command: click.Command = cli
    rest = _unparsed(ctx)
    while isinstance(command, click.Group) and rest:
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        ctx = sub.make_context(name, rest, parent=ctx)
        path.append(name)
        command, rest = sub, _unparsed(ctx)
    assert not isinstance(command, click.Group), f"{args}: names a group, not a command"
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory laid out as the README assumes: ./agent, keys/, and the repo's examples/."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "keys").mkdir()
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_shows_the_commands_a_user_needs() -> None:
    paths = [" ".join(shlex.split(" ".join(c[1:3]))) for c in readme_commands()]
    assert len(paths) >= 14
    for wanted in ("keys init", "image build", "vm up", "promote --repo", "job run", "receipts verify"):
        assert any(p.startswith(wanted) for p in paths), wanted


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a[1:3]))
def test_every_readme_command_parses_as_written(argv: list[str], workdir: Path) -> None:
    (workdir / "keys" / "cosign.key").write_text("placeholder: parsing only reads the path\n")
    (workdir / "keys" / "cosign.pub").write_text("placeholder\n")
    assert _parse(argv[1:])


def test_a_readme_command_with_a_wrong_option_does_not_parse(workdir: Path) -> None:
    with pytest.raises(click.UsageError):
        _parse(["promote", "--repo", "./agent", "--comit", "v2", "--target", "demo"])


def _avm(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def test_the_shipped_job_spec_pins_the_image_its_script_builds(workdir: Path) -> None:
    env = {**os.environ, "AVM_HOME": str(workdir / "home")}
    build = next(c for c in readme_commands() if c[1:3] == ["image", "build-job"])
    out = _avm([build[0], "--json", *build[1:]], env)
    assert out.returncode == 0, out.stderr
    built = yaml.safe_load(out.stdout)["image"]
    assert yaml.safe_load(JOB_SPEC.read_text())["image"] == built
    sign = next(c for c in readme_commands() if c[1:3] == ["image", "sign"])
    assert sign[3] == built


def test_the_readme_job_commands_run_as_written(workdir: Path, golden_image: object) -> None:
    needs_job_tools()
    env = {
        **os.environ,
        "AVM_HOME": str(workdir / "home"),
        "AVM_IMAGE_CACHE": str(shared_image_store()),
        "COSIGN_PASSWORD": "readme-test",  # generated keys for this test only
    }
    ran = []
    for argv in readme_commands():
        if not any(" ".join(argv[1:]).startswith(prefix) for prefix in RUN_FOR_REAL):
            continue
        out = _avm(argv, env)
        assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stdout}\n{out.stderr}"
        ran.append(next(p for p in RUN_FOR_REAL if " ".join(argv[1:]).startswith(p)))
        if argv[1:3] == ["job", "run"]:
            assert "hello from a Tier-2 microVM job: hi from examples/jobs" in out.stdout
            assert "network interfaces: none (default-deny egress)" in out.stdout
    assert ran == list(RUN_FOR_REAL)  # every one of them is in the README, in this order, and ran
