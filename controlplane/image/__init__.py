"""The golden image: built from code, stored by digest, described by an SBOM and provenance.

* ``recipe``: the image recipe (package data ``golden.yaml``), validated.
* ``build``: ``avm image build`` (mmdebstrap in a private mount namespace, then ext4 + qcow2).
* ``hook``: the customize hook that runs inside the build's chroot.
* ``golden``: the built image's artifacts and manifest, as the VM backends read them.
* ``store`` / ``sbom`` / ``sign`` / ``provenance``: the content-addressed image store, the SPDX
  SBOM, image signatures and the SLSA provenance that ``avm image verify`` checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane._internal.lazy import exports

if TYPE_CHECKING:
    from controlplane.image.build import build_image
    from controlplane.image.golden import GoldenImage, load_image
    from controlplane.image.recipe import Recipe, load_recipe

__all__ = ["GoldenImage", "Recipe", "build_image", "load_image", "load_recipe"]
__getattr__ = exports(
    __name__,
    {
        "Recipe": "recipe",
        "load_recipe": "recipe",
        "build_image": "build",
        "GoldenImage": "golden",
        "load_image": "golden",
    },
)
