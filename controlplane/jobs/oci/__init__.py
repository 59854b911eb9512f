"""The OCI image store of Tier-2 jobs: content-addressed blobs, layers, digest-pinned references."""
