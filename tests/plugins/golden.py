"""The golden image, built once for the whole test session and shared across sessions.

The image store is ``$AVM_IMAGE_CACHE`` when set, else ``/var/tmp/avm-image-cache``; images in it
are keyed by recipe digest, so a suite (or the demo) that finds the image of the current
``images/golden.yaml`` already built reuses it in under a second, and a changed recipe builds
a new one (about 100 s cold). Building needs root: without it the fixture fails and says so
(tests/plugins/require.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from controlplane.image.golden import IMAGE_CACHE_ENV, GoldenImage
from controlplane.image.recipe import DEFAULT_RECIPE, load_recipe

SHARED_IMAGE_CACHE = Path("/var/tmp/avm-image-cache")


def shared_image_store() -> Path:
    return Path(os.environ.get(IMAGE_CACHE_ENV) or SHARED_IMAGE_CACHE)


@pytest.fixture(scope="session")
def golden_image() -> GoldenImage:
    """The image of ``images/golden.yaml`` (built now if the shared store lacks it)."""
    from controlplane.image.build import REQUIRED_TOOLS, build_image
    from tests.plugins.require import require_root, require_tools

    require_root("building the golden image: mmdebstrap --mode=root")
    require_tools(*REQUIRED_TOOLS)

    def progress(line: str) -> None:
        print(line, file=sys.stderr)

    result = build_image(load_recipe(DEFAULT_RECIPE), shared_image_store(), progress=progress)
    return result.image
