"""docs/architecture.md's package tree matches the packages and modules on disk, both ways."""

from __future__ import annotations

from pathlib import Path

import pytest

import controlplane

ROOT = Path(controlplane.__file__).parent
DOC = ROOT.parent / "docs" / "architecture.md"
DATA_PACKAGES = {"data", "hostscripts", "guestscripts"}


def _documented() -> dict[str, set[str]]:
    """package path -> module names, from the tree: ``  pkg/ mod mod  # comment``, nesting by indent."""
    text = DOC.read_text()
    start = text.index("```\ncontrolplane/\n") + len("```\ncontrolplane/\n")
    out: dict[str, set[str]] = {}
    stack: list[str] = []
    for line in text[start : text.index("```", start)].splitlines():
        words = line.split("#")[0].split()
        if not words:
            continue
        if words[0].endswith("/"):
            if words[0].rstrip("/") in DATA_PACKAGES:
                continue
            depth = (len(line) - len(line.lstrip()) - 2) // 2
            stack = [*stack[:depth], words[0].rstrip("/")]
            out["/".join(stack)] = set(words[1:])
        else:
            out.setdefault("", set()).update(words)
    return out


def _on_disk() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for init in ROOT.rglob("__init__.py"):
        pkg = init.parent.relative_to(ROOT).as_posix()
        if pkg in DATA_PACKAGES:
            continue
        names = {p.stem for p in init.parent.glob("*.py")} - {"__init__", "__main__"}
        out["" if pkg == "." else pkg] = names
    return out


def test_every_package_and_module_is_in_the_tree_and_nothing_else_is() -> None:
    assert _documented() == _on_disk()


def test_the_data_packages_named_in_the_tree_exist() -> None:
    assert all((ROOT / name).is_dir() for name in DATA_PACKAGES)


PACKAGES_WITH_ENTRY_POINTS = (
    "evidence",
    "release",
    "governance",
    "image",
    "promote",
    "jobs",
    "transport",
    "vm",
)


def test_each_package_re_exports_two_to_five_entry_points_that_resolve() -> None:
    import importlib

    for name in PACKAGES_WITH_ENTRY_POINTS:
        package = importlib.import_module(f"controlplane.{name}")
        exported = package.__all__
        assert 2 <= len(exported) <= 5, (name, exported)
        for attr in exported:
            value = getattr(package, attr)
            assert getattr(value, "__module__", "").startswith(f"controlplane.{name}"), (name, attr)
        with pytest.raises(AttributeError, match="no_such_entry_point"):
            _ = package.no_such_entry_point


def test_importing_a_package_does_not_import_its_entry_points() -> None:
    import json
    import subprocess
    import sys

    probe = (
        "import json, sys, controlplane.jobs, controlplane.evidence, controlplane.promote\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('controlplane.'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not loaded & {
        "controlplane.jobs.runner",
        "controlplane.evidence.step",
        "controlplane.promote.pipeline",
    }
