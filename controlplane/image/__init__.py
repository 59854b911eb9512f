"""The golden image: built from code, stored by digest, described by an SBOM and provenance.

* ``recipe``: the image recipe (package data ``golden.yaml``), validated.
* ``build``: ``avm image build`` (mmdebstrap in a private mount namespace, then ext4 + qcow2).
* ``hook``: the customize hook that runs inside the build's chroot.
* ``golden``: the built image's artifacts and manifest, as the VM backends read them.
* ``store`` / ``sbom`` / ``sign`` / ``provenance``: the content-addressed image store, the SPDX
  SBOM, image signatures and the SLSA provenance that ``avm image verify`` checks.
"""
