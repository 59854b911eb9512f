"""Release: what is promoted, exactly, and who vouched for it.

* ``git``: resolve an exact commit and read its tree (one wrapped ``git``).
* ``bundle``: the release bundle of a commit (file list with modes, digests) and its bytes.
* ``manifest``: ``avm.yaml`` at the commit, validated.
* ``trust``: sign and verify release bundles (cosign-compatible), the trust policy.
* ``cosign`` / ``sigstorebundle`` / ``sigstorekeyed`` / ``sigstoretrust``: the signature formats
  (cosign blobs, Sigstore bundles keyless and keyed) and the trusted root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane._internal.lazy import exports

if TYPE_CHECKING:
    from controlplane.release.bundle import Bundle
    from controlplane.release.manifest import ReleaseManifest, parse_manifest
    from controlplane.release.trust import sign_release, verify_release

__all__ = ["Bundle", "ReleaseManifest", "parse_manifest", "sign_release", "verify_release"]
__getattr__ = exports(
    __name__,
    {
        "Bundle": "bundle",
        "ReleaseManifest": "manifest",
        "parse_manifest": "manifest",
        "sign_release": "trust",
        "verify_release": "trust",
    },
)
