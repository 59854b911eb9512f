"""The mmdebstrap stage of the image build: packages into the rootfs, then the customize hook.

mmdebstrap runs with ``SOURCE_DATE_EPOCH`` set to the recipe's source date (it and the maintainer
scripts it runs honour it) and, for a rebuild from an image's record, with every package pinned
to its recorded version.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import controlplane
from controlplane._internal import tools as imagetools
from controlplane.errors import CommandFailed, OperationalError
from controlplane.image import repro as imagerepro
from controlplane.image.golden import ARTIFACT_FILES
from controlplane.image.hook import RECIPE_ENV, REPORT_ENV
from controlplane.image.recipe import Recipe
from controlplane.transport.base import RunResult

_HOOK_SHIM = """#!{python}
# avm image build: mmdebstrap runs this file directly (no shell) as its --customize-hook
import sys

from controlplane.image.hook import main

raise SystemExit(main(sys.argv[1:]))
"""


def mmdebstrap(
    work: Path, rootfs: Path, recipe: Recipe, pins: tuple[str, ...]
) -> tuple[RunResult, dict[str, Any]]:
    """Run mmdebstrap into ``rootfs`` with the customize hook; return its result and the hook's report.

    ``pins`` (``name:arch=version``) go into an apt preferences file uploaded by a setup hook, so
    apt installs exactly those versions; ``imagerepro.normalize_rootfs`` removes the file again.
    """
    hook = work / "customize-hook"
    if any(c.isspace() for c in sys.executable):
        raise OperationalError(
            "python-path-unusable",
            f"the Python interpreter path {sys.executable!r} contains whitespace and cannot be a #! line",
            hint="create the virtualenv under a path without spaces",
        )
    setup_hooks = []
    if pins:  # mmdebstrap splits a special hook into words: the path must have no whitespace
        if any(c.isspace() for c in str(work)):
            raise OperationalError(
                "image-store-unusable",
                f"the image store path {work.parent} contains whitespace; a pinned rebuild cannot use it",
                hint="point AVM_IMAGE_CACHE at a path without spaces",
            )
        (work / "pins").write_text(imagerepro.pins_text(pins))
        setup_hooks.append(f"upload {work / 'pins'} /{imagerepro.PINS_FILE}")
    hook.write_text(_HOOK_SHIM.format(python=sys.executable))
    hook.chmod(0o755)
    report = work / "customize-report.json"
    package_root = str(Path(controlplane.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env.update(
        {
            RECIPE_ENV: str(work / ARTIFACT_FILES["recipe"]),
            REPORT_ENV: str(report),
            "PYTHONPATH": os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p),
            "SOURCE_DATE_EPOCH": str(recipe.source_date_epoch),
        }
    )
    trim = recipe.trim
    argv = imagetools.mmdebstrap_argv(
        suite=recipe.suite,
        target=rootfs,
        mirrors=recipe.sources(),
        variant=recipe.variant,
        architecture=recipe.architecture,
        components=recipe.components,
        packages=recipe.packages,
        dpkg_options=[
            *(f"path-exclude={p}" for p in trim.dpkg_path_exclude),
            *(f"path-include={p}" for p in trim.dpkg_path_include),
        ],
        customize_hooks=[hook],
        setup_hooks=setup_hooks,
    )
    try:
        run = imagetools.mmdebstrap(argv, env)
    except CommandFailed as exc:
        error = _read_json(report).get("error")
        if error:
            raise OperationalError(
                "image-customize-failed",
                f"the customize hook failed: [{error.get('code')}] {error.get('message')}",
                hint="fix the recipe setting it names; packages were installed, nothing was published",
                details={"hook_error": error, "rc": exc.rc, "stderr": exc.stderr[-4000:]},
            ) from exc
        raise
    return run, _read_json(report)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
