"""Release: what is promoted, exactly, and who vouched for it.

* ``git``: resolve an exact commit and read its tree (one wrapped ``git``).
* ``bundle``: the release bundle of a commit (file list with modes, digests) and its bytes.
* ``manifest``: ``avm.yaml`` at the commit, validated.
* ``trust``: sign and verify release bundles (cosign-compatible), the trust policy.
* ``cosign`` / ``sigstorebundle`` / ``sigstorekeyed`` / ``sigstoretrust``: the signature formats
  (cosign blobs, Sigstore bundles keyless and keyed) and the trusted root.
"""
