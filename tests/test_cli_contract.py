"""The CLI contract every later command relies on: exit codes, error boundary, --help speed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from controlplane.cli import cli, main
from controlplane.errors import EXIT_CODE_HELP

AVM = [sys.executable, "-m", "controlplane"]


def avm(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if home is not None:
        env["AVM_HOME"] = str(home)
    return subprocess.run([*AVM, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def _walk(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _walk(command, (*path, name))


# every command and group, from the click tree itself (a new command is covered without editing here)
COMMANDS = list(_walk(cli))


def test_help_lists_every_group_and_the_exit_codes() -> None:
    out = avm("--help")
    assert out.returncode == 0
    section = out.stdout[out.stdout.index("Commands:\n") :].split("\n\n")[0]
    listed = re.findall(r"^  ([a-z][a-z-]*)  ", section, re.M)
    assert listed == sorted(cli.commands)
    table = out.stdout[out.stdout.index("Exit codes:\n") :]
    assert re.findall(r"^ +(\d+)  (.+)$", table, re.M)[: len(EXIT_CODE_HELP)] == [
        (str(int(code)), text) for code, text in EXIT_CODE_HELP.items()
    ]


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``avm ARGS`` in this process, through the same error boundary as the console script."""
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    assert isinstance(done.value.code, int)
    return done.value.code, out, err


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_the_output_flags(
    path: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _main(["--home", str(tmp_path / "h"), *path, "--help"], capsys)
    assert (rc, err) == (0, "")
    assert out.startswith(f"Usage: avm {' '.join(path)} ")
    assert "--json" in out and "--debug" in out
    assert not (tmp_path / "h").exists()  # help touches nothing


# commands whose arguments pass through to another program take an unknown option as an argument
PASSTHROUGH: dict[tuple[str, ...], str] = {("vm", "ssh"): "Error: Missing argument 'ARGV...'."}


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_refuses_an_unknown_option_with_64(
    path: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _main(["--home", str(tmp_path / "h"), *path, "--no-such-option"], capsys)
    assert (rc, out) == (64, "")
    assert PASSTHROUGH.get(path, "Error: No such option '--no-such-option'.") in err
    assert "Traceback" not in err
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["--no-such-option"],
        ["receipts", "show"],  # missing argument
    ],
)
def test_usage_errors_exit_64_not_clicks_2(args: list[str], tmp_path: Path) -> None:
    out = avm(*args, home=tmp_path)
    assert out.returncode == 64, out.stderr
    assert "Traceback" not in out.stderr


def test_help_is_fast_because_heavy_imports_are_lazy() -> None:
    # Measured in a fresh interpreter: what `avm --help` imports must not include the heavy stacks.
    code = (
        "import sys, controlplane.cli as c\n"
        "heavy = [m for m in ('paramiko', 'cryptography', 'pulumi', 'libvirt', 'rich', 'yaml', 'pydantic')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at --help time: {out.stdout.strip()}"
    # the latency itself is a benchmark (bench/cli.py), not an assertion
    assert avm("--help").returncode == 0


def test_expected_error_prints_code_and_hint_without_traceback(tmp_path: Path) -> None:
    out = avm("--home", str(tmp_path / "h"), "vm", "ssh", "../etc", "--", "true")
    assert out.returncode == 64, out.stderr
    assert "error[invalid-vm-name]" in out.stderr and "  hint: " in out.stderr
    assert "Traceback" not in out.stderr


def test_json_errors_are_one_document_on_stdout(tmp_path: Path) -> None:
    out = avm("--json", "--home", str(tmp_path / "h"), "receipts", "show", "999999")
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["error"]["code"] == "receipt-not-found"
    assert doc["error"]["exit_code"] == 1


def _home_with_a_tampered_chain(tmp_path: Path) -> Path:
    """A home whose receipt #1 had one byte of its signature changed: verify refuses, exit 3."""
    root = tmp_path / "h"
    assert avm("--home", str(root), "keys", "init").returncode == 0
    first = root / "receipts" / "00000001.json"
    doc = json.loads(first.read_bytes())
    sig = doc["signatures"][0]["sig"]
    doc["signatures"][0]["sig"] = ("B" if sig[0] == "A" else "A") + sig[1:]
    first.write_bytes(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())
    return root


@pytest.mark.parametrize(
    ("args", "rc", "code"),
    [
        (["receipts", "verify"], 3, "receipt-signature-invalid"),
        (["receipts", "show", "nothex"], 64, "receipt-id-invalid"),
        (["receipts", "show", "999999"], 1, "receipt-not-found"),
    ],
)
def test_debug_adds_a_traceback_and_changes_nothing_else(
    tmp_path: Path, args: list[str], rc: int, code: str
) -> None:
    root = _home_with_a_tampered_chain(tmp_path)
    plain = avm("--home", str(root), *args)
    debug = avm("--debug", "--home", str(root), *args)
    assert plain.returncode == rc and debug.returncode == rc, debug.stderr
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert f"error[{code}]" in plain.stderr and f"error[{code}]" in debug.stderr
    assert debug.stdout == plain.stdout
    as_json = avm("--json", "--debug", "--home", str(root), *args)
    assert as_json.returncode == rc
    assert json.loads(as_json.stdout)["error"]["code"] == code  # stdout is still the one document
    assert "Traceback" in as_json.stderr


def test_json_and_debug_are_accepted_after_any_command(tmp_path: Path) -> None:
    root = tmp_path / "h"
    assert avm("--home", str(root), "keys", "init", "--json").returncode == 0
    before = avm("--json", "--home", str(root), "receipts", "list")
    after = avm("--home", str(root), "receipts", "list", "--json")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout)
    # on a group, on a subcommand, and as an error document
    assert json.loads(avm("--home", str(root), "receipts", "--json", "list").stdout) == json.loads(
        before.stdout
    )
    err = avm("--home", str(root), "status", "--target", "nope", "--json", "--debug")
    assert err.returncode == 64
    assert json.loads(err.stdout)["error"]["code"] == "unknown-target"
    assert "Traceback" in err.stderr
    # every command and group lists them in its help: test_every_command_has_help_with_the_output_flags


def test_status_of_an_unknown_target_is_a_usage_error_like_promote(tmp_path: Path) -> None:
    root = tmp_path / "h"
    assert avm("--home", str(root), "keys", "init").returncode == 0
    out = avm("--json", "--home", str(root), "status", "--target", "nope")
    assert out.returncode == 64, out.stdout + out.stderr
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "unknown-target"
    assert error["details"] == {"expected": "a name from the inventory", "actual": "nope"}
    # a name that is not a name at all is refused before it can reach a message's hint
    hostile = "x;$(touch /tmp/avm-pwned)"
    bad = avm("--json", "--home", str(root), "status", "--target", hostile)
    assert bad.returncode == 64
    error = json.loads(bad.stdout)["error"]
    assert error["code"] == "invalid-vm-name"
    assert hostile not in error["hint"]


def test_docs_cli_commands_table_names_every_command_and_nothing_else() -> None:
    """docs/cli.md's table: a group row lists its subcommands; other rows name top-level commands."""
    import click

    from controlplane.cli import cli

    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    table = text[text.index("## Commands") : text.index("## The state directory")]
    documented: set[str] = set()
    for row in (r for r in table.splitlines() if r.startswith("| `")):
        first, second = (c.strip() for c in row.strip("|").split("|")[:2])
        heads = [w.split()[0] for w in re.findall(r"`([^`]+)`", first)]
        group = cli.commands.get(heads[0])
        if len(heads) == 1 and isinstance(group, click.Group):
            subs = [w.split()[0] for w in re.findall(r"`([^`]+)`", second) if not w.startswith("-")]
            documented |= {f"{heads[0]} {s}" for s in subs}
        else:
            documented |= set(heads)
    actual = {
        f"{name} {sub}" if isinstance(cmd, click.Group) else name
        for name, cmd in cli.commands.items()
        for sub in (cmd.commands if isinstance(cmd, click.Group) else [""])
    }
    assert documented == actual
