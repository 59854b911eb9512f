"""avm installs from a wheel: the data files are package data, read with importlib.resources.

The wheel is built from a copy of the source tree (so the worktree gets no build/ or egg-info),
installed with ``--no-deps`` into a fresh venv whose only other path is this venv's
site-packages (for click, pydantic, ...; its ``.pth`` files, the editable install among them,
are not processed there), and run from a directory outside the source tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from controlplane.governance import tiers
from controlplane.ids import TIER_IDS

REPO = Path(__file__).resolve().parents[1]
# top-level file users expect -> its canonical copy (package data)
SHIPPED = {
    "tiers/tiers.yaml": "controlplane/data/tiers.yaml",
    "units/agent-gateway@.service": "controlplane/data/agent-gateway@.service",
    "images/golden.yaml": "controlplane/data/golden.yaml",
    "images/guest-kernel.config": "controlplane/data/guest-kernel.config",
}


@pytest.mark.parametrize("top", sorted(SHIPPED))
def test_the_top_level_file_is_the_package_copy(top: str) -> None:
    assert (REPO / top).read_bytes() == (REPO / SHIPPED[top]).read_bytes()
    assert (REPO / top).resolve() == (REPO / SHIPPED[top]).resolve()  # a symlink, not a second copy


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh venv, the wheel) with the wheel of this source tree installed in it."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(
        REPO,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache"),
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    dist = base / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], base, env)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("agent_vm-*.whl")
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, env)
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, env)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib.stdout.strip(), "avm-test-deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    inst = _run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)], base, env)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    return venv, wheel


def test_the_wheel_carries_the_data_and_the_scripts(installed: tuple[Path, Path]) -> None:
    names = set(zipfile.ZipFile(installed[1]).namelist())
    for canonical in SHIPPED.values():
        assert canonical in names
    scripts = {
        f"controlplane/hostscripts/{n}.py"
        for n in ("gather_facts", "sandbox_probe", "unpack_release", "flip_link", "health_probe", "net_probe")
    } | {f"controlplane/guestscripts/{n}.sh" for n in ("job_init", "budget", "initramfs_init")}
    # the warm-start identity gate the qemu initramfs installs into the golden VM
    scripts |= {
        f"controlplane/guestscripts/{n}"
        for n in (
            "identity_gate.py",
            "avm-identity.service",
            "sshd-avm.conf",
            "avm-first.conf",
            "avm-session-priority.conf",
        )
    }
    assert scripts <= names
    assert "controlplane/data/sigstore/trusted_root.json" in names  # keyless Sigstore verification


def test_avm_runs_from_the_wheel_outside_the_source_tree(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    venv = installed[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["AVM_HOME"] = str(tmp_path / "home")
    avm = str(venv / "bin" / "avm")
    py = str(venv / "bin" / "python")

    where = _run([py, "-c", "import controlplane; print(controlplane.__file__)"], elsewhere, env)
    assert where.returncode == 0, where.stderr
    site = Path(where.stdout.strip()).parent.parent
    assert site.is_relative_to(venv), where.stdout  # the wheel's copy, not the editable checkout

    helped = _run([avm, "--help"], elsewhere, env)
    assert helped.returncode == 0, helped.stderr
    assert "\n  tiers " in helped.stdout

    shown = _run([avm, "tiers", "show"], elsewhere, env)
    assert shown.returncode == 0, shown.stderr
    data = site / "controlplane" / "data"
    assert f"tier data: {data / 'tiers.yaml'} ({tiers.load().digest})" in shown.stdout
    as_json = _run([avm, "--json", "tiers", "show"], elsewhere, env)
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert [t["id"] for t in doc["tiers"]] == list(TIER_IDS)
    assert doc["digest"] == tiers.load().digest

    exported = _run([py, "-m", "controlplane.schemas", "schema"], elsewhere, env)
    assert exported.returncode == 0, exported.stderr
    shipped = REPO / "receipts" / "schema"
    ours = sorted(p.name for p in shipped.iterdir())
    assert sorted(p.name for p in (elsewhere / "schema").iterdir()) == ours
    for name in ours:
        assert (elsewhere / "schema" / name).read_bytes() == (shipped / name).read_bytes()

    # every data file, read the way the product reads it, has the bytes of the source tree
    read = (
        "import hashlib, json\n"
        "from controlplane.governance import tiers\n"
        "from controlplane.image import recipe\n"
        "from controlplane.jobs import guest as guestinit, kernel as guestkernel\n"
        "from controlplane.promote import hostops, render\n"
        "print(json.dumps({\n"
        " 'tiers/tiers.yaml': tiers.TIERS_FILE.read_bytes(),\n"
        " 'units/agent-gateway@.service': render.unit_template(),\n"
        " 'images/golden.yaml': recipe.DEFAULT_RECIPE.read_bytes(),\n"
        " 'images/guest-kernel.config': guestkernel.FRAGMENT.read_bytes(),\n"
        " 'job_init.sh': guestinit.INIT.encode(), 'unpack_release.py': hostops._UNPACK.encode(),\n"
        "} | {'recipe': recipe.load_recipe(recipe.DEFAULT_RECIPE).digest().encode()},"
        " default=lambda b: hashlib.sha256(b).hexdigest()))\n"
    )
    got = _run([py, "-c", read], elsewhere, env)
    assert got.returncode == 0, got.stderr
    from controlplane.image.recipe import DEFAULT_RECIPE, load_recipe

    want = {top: hashlib.sha256((REPO / top).read_bytes()).hexdigest() for top in SHIPPED}
    want["job_init.sh"] = hashlib.sha256(
        (REPO / "controlplane/guestscripts/job_init.sh").read_bytes()
    ).hexdigest()
    want["unpack_release.py"] = hashlib.sha256(
        (REPO / "controlplane/hostscripts/unpack_release.py").read_bytes()
    ).hexdigest()
    want["recipe"] = hashlib.sha256(load_recipe(DEFAULT_RECIPE).digest().encode()).hexdigest()
    assert json.loads(got.stdout) == want
