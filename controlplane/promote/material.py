"""Release material: the exact bytes a promotion writes to a host, and their digests.

Rendering (manifest -> env file, unit drop-in, tool policy) happens before planning; the plan is
computed from the digests of these bytes, and apply writes exactly these bytes. Secret *values*
are never part of material: only references, resolved at apply time.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from controlplane.canonical import sha256_digest
from controlplane.ids import CommitSha, Digest
from controlplane.promote.plan import DesiredProfile, DesiredState

if TYPE_CHECKING:
    from controlplane.boundary.tier1 import Tier1Gateway


@dataclasses.dataclass(frozen=True)
class HealthCheck:
    port: int
    path: str = "/healthz"
    timeout_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class ReleaseMaterial:
    sha: CommitSha
    bundle: bytes  # the deterministic tar of the exact commit
    files: dict[str, str]  # relative path -> sha256:... or symlink:TARGET (what the release dir must hold)
    bundle_digest: Digest
    executables: tuple[str, ...] = ()  # files unpacked 0555 (the others 0444)


@dataclasses.dataclass(frozen=True)
class ProfileMaterial:
    name: str
    release: str
    env: bytes
    policy: bytes
    dropin: bytes
    health: HealthCheck
    canary: bool = False
    soak_s: float = 0.0
    secret_refs: tuple[tuple[str, str], ...] = ()  # (credential name, secret://STORE/NAME)
    # the manifest's egress allowlist as (host or CIDR, port, proto): the unit's IPAddressAllow=
    # on cgroup2 hosts, the host-side nftables chain on nspawn (controlplane.vm.nspawnnet)
    egress: tuple[tuple[str, int, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Material:
    unit: bytes
    releases: dict[str, ReleaseMaterial]
    profiles: tuple[ProfileMaterial, ...]
    # the host's egress gateway (None: no profile lists a name); its digest is in the drop-ins
    gateway: Tier1Gateway | None = None

    def profile(self, name: str) -> ProfileMaterial:
        return next(p for p in self.profiles if p.name == name)

    def desired(self) -> DesiredState:
        return DesiredState(
            unit_template=sha256_digest(self.unit),
            releases={sha: dict(rel.files) for sha, rel in self.releases.items()},
            release_exec={sha: rel.executables for sha, rel in self.releases.items()},
            profiles=tuple(
                DesiredProfile(
                    name=p.name,
                    release=p.release,
                    env=sha256_digest(p.env),
                    policy=sha256_digest(p.policy),
                    dropin=sha256_digest(p.dropin),
                    canary=p.canary,
                )
                for p in self.profiles
            ),
        )
