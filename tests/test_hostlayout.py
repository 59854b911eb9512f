"""One HostLayout: the Tier-1 host paths and unit names are spelled in controlplane/promote/layout.py."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import controlplane
from controlplane.promote import facts, hostops, unitcheck
from controlplane.promote.layout import LAYOUT, HostLayout

PACKAGE = Path(controlplane.__file__).parent
# what only the layout may spell: the roots, the unit name, and the profile user's prefix
SPELLINGS = ("/opt/agent", "/etc/agent", "agent-gateway@", "agent-gateway-")
# ids.py owns the user prefix (the profile-name length rule counts it; the layout imports it);
# the host-side programs run on the host with no avm installed: they cannot import the layout
EXEMPT = {"promote/layout.py", "ids.py"} | {
    f"hostscripts/{p.name}" for p in (PACKAGE / "hostscripts").glob("*.py")
}


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant of a module except docstrings (f-string pieces included)."""
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def _spelled(source: str) -> list[tuple[int, str]]:
    out = []
    for line, value in _strings(ast.parse(source)):
        if any(s in value for s in SPELLINGS) or value == "agent-" or value.startswith("agent-{"):
            out.append((line, value))
    return out


def test_no_other_module_builds_a_host_path_or_unit_name() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in EXEMPT and (hits := _spelled(path.read_text())):
            found[rel] = hits
    assert found == {}


@pytest.mark.parametrize(
    "source",
    [
        'UNIT = f"agent-gateway@{p}.service"\n',
        'ROOT = "/opt/agent"\n',
        'user = f"agent-{p}"\n',
        'user = "agent-" + p\n',
        'x = f"{ETC}/credentials" if True else "/etc/agent/x"\n',
    ],
)
def test_the_check_finds_each_spelling(source: str) -> None:
    assert len(_spelled(source)) == 1


def test_a_docstring_may_describe_the_layout() -> None:
    assert _spelled('"""Releases live in /opt/agent/releases."""\nX = 1\n') == []


def test_the_layout_is_today_s_host_layout() -> None:
    assert HostLayout("/opt/agent", "/etc/agent", "/etc/systemd/system") == LAYOUT
    assert {
        "release": LAYOUT.release_dir("abc"),
        "incoming": LAYOUT.incoming_tar("abc"),
        "current": LAYOUT.current_link("web"),
        "env": LAYOUT.env_file("web"),
        "policy": LAYOUT.policy_file("web"),
        "credential": LAYOUT.credential("web", "TOKEN"),
        "template": LAYOUT.unit_template,
        "dropin": LAYOUT.dropin("web"),
        "unit": LAYOUT.unit_name("web"),
        "user": LAYOUT.user("web"),
    } == {
        "release": "/opt/agent/releases/abc",
        "incoming": "/opt/agent/releases/.incoming/abc.tar",
        "current": "/opt/agent/profiles/web/current",
        "env": "/etc/agent/web.env",
        "policy": "/etc/agent/web.policy.json",
        "credential": "/etc/agent/credentials/web/TOKEN",
        "template": "/etc/systemd/system/agent-gateway@.service",
        "dropin": "/etc/systemd/system/agent-gateway@web.service.d/avm.conf",
        "unit": "agent-gateway@web.service",
        "user": "agent-web",
    }


def test_the_modules_use_the_layout() -> None:
    assert hostops.profile_file("write-dropin", "web") == (LAYOUT.dropin("web"), 0o644)
    assert unitcheck.avm_files("web") == (LAYOUT.unit_template, LAYOUT.dropin("web"))
    request = json.loads(facts.gather_argv(["web"], [], prefix="/scratch")[-1])
    assert {k: request[k] for k in ("releases", "profiles_dir", "etc", "unit_dir")} == {
        "releases": "/scratch/opt/agent/releases",
        "profiles_dir": "/scratch/opt/agent/profiles",
        "etc": "/scratch/etc/agent",
        "unit_dir": "/scratch/etc/systemd/system",
    }
