"""Risk tiers L0-L5 as data (``tiers/tiers.yaml``): each tier's meaning and required controls.

The file is parsed at the edge into frozen models; an unknown control id, a missing tier, a tier
that requires approval without saying how many approvers, or one that requires a soak or a
rollback drill without its bounds is refused (``OperationalError('tiers-invalid')``), so a typo
can never weaken a gate. The control ids are the fixed vocabulary ``CONTROLS``.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Literal

from pydantic import Field, model_validator

from controlplane._internal.loading import Frozen, parse_yaml, validate
from controlplane.canonical import canonical_bytes, sha256_digest
from controlplane.errors import OperationalError, UsageError
from controlplane.ids import TIER_IDS, RiskTier

# package data (``tiers/tiers.yaml`` at the top of the source tree is a symlink to it), so a wheel
# install reads the same bytes as a checkout
TIERS_FILE: Traversable = files("controlplane").joinpath("data/tiers.yaml")
Control = Literal[
    "signature",
    "digest-pins",
    "no-raw-secrets",
    "default-deny-egress",
    "tool-allowlist",
    "approval",
    "canary-soak",
    "rollback-drill",
    "tier2-only",
    "dedicated-vm",
    "credentials-at-boundary",
]

# What each control checks, in words (for `avm tiers show` and docs/governance.md).
CONTROLS: dict[str, str] = {
    "signature": "the release (Tier-1) or job image (Tier-2) verifies against a trusted key",
    "digest-pins": "every artifact / image is pinned by sha256 digest",
    "no-raw-secrets": "env holds no secret-looking value; secrets are secret://STORE/NAME references",
    "default-deny-egress": (
        "egress denies by default and lists destinations (no 0.0.0.0/0 or ::/0); Tier-1: observed "
        "in force from the sandbox after the restart"
    ),
    "tool-allowlist": "an explicit MCP tool allowlist, each tool pinned by its schema sha256",
    "approval": "N distinct trusted approvers (never the promoter) signed this exact plan digest",
    "canary-soak": "a canary profile goes first and soaks for at least soak_min_s",
    "rollback-drill": "a rollback on this target succeeded in <= max_minutes within the last within_days",
    "tier2-only": "runs only as an ephemeral Tier-2 microVM job, never as a resident Tier-1 service",
    "dedicated-vm": "runs in a VM of its own (each Tier-2 job's microVM is one)",
    "credentials-at-boundary": (
        "a credential bound to a destination (an egress entry's credential) is injected by the "
        "gateway and never reaches the agent (not also under secrets:)"
    ),
}


class RollbackDrill(Frozen):
    max_minutes: float = Field(gt=0, le=1440)
    within_days: float = Field(gt=0, le=365)


class Tier(Frozen):
    """One risk tier and the controls a workload at that tier must pass."""

    id: RiskTier
    name: str = Field(min_length=1, max_length=64)
    description: str = Field(min_length=1, max_length=300)
    controls: tuple[Control, ...]
    approvers: int = Field(default=0, ge=0, le=10)
    soak_min_s: float = Field(default=0.0, ge=0, le=86400)
    rollback_drill: RollbackDrill | None = None
    egress_max_addresses: int | None = Field(
        default=None, ge=1, le=1 << 32, description="IPv4 addresses an egress allowlist may open in all"
    )

    @model_validator(mode="after")
    def _bounds_present(self) -> Tier:
        if not self.controls and self.id != "L0":
            raise ValueError(f"{self.id}: no control listed; only L0 may have none (it would pass anything)")
        if ("default-deny-egress" in self.controls) != (self.egress_max_addresses is not None):
            raise ValueError(f"{self.id}: 'default-deny-egress' and egress_max_addresses go together")
        if ("approval" in self.controls) != (self.approvers > 0):
            raise ValueError(f"{self.id}: 'approval' and approvers >= 1 go together")
        if "canary-soak" in self.controls and self.soak_min_s <= 0:
            raise ValueError(f"{self.id}: 'canary-soak' needs soak_min_s > 0")
        if ("rollback-drill" in self.controls) != (self.rollback_drill is not None):
            raise ValueError(f"{self.id}: 'rollback-drill' and rollback_drill bounds go together")
        if len(set(self.controls)) != len(self.controls):
            raise ValueError(f"{self.id}: a control is listed twice")
        return self


class TierTable(Frozen):
    tiers: tuple[Tier, ...]

    @model_validator(mode="after")
    def _all_tiers_in_order(self) -> TierTable:
        ids = tuple(t.id for t in self.tiers)
        if ids != TIER_IDS:
            raise ValueError(f"tiers must be exactly {list(TIER_IDS)} in order, got {list(ids)}")
        return self

    def get(self, tier_id: str) -> Tier:
        """Raises ``UsageError('tier-unknown')``."""
        for tier in self.tiers:
            if tier.id == tier_id:
                return tier
        raise UsageError(
            "tier-unknown",
            f"risk tier {tier_id!r} does not exist",
            hint=f"tiers: {', '.join(TIER_IDS)}",
            details={"expected": list(TIER_IDS), "actual": tier_id},
        )

    @property
    def digest(self) -> str:
        """What receipts record: the exact tier data a decision was made against."""
        return sha256_digest(canonical_bytes(self.model_dump(mode="json")))


def parse_tiers(data: bytes, *, source: str = "tiers.yaml") -> TierTable:
    """Raises ``OperationalError('tiers-invalid')``: without valid tier data no gate can run."""
    hint = "fix tiers/tiers.yaml; promotion and jobs are refused until it is valid"
    raw = parse_yaml(data, code="tiers-invalid", source=source, error=OperationalError)
    return validate(TierTable, raw, code="tiers-invalid", source=source, hint=hint, error=OperationalError)


@functools.cache
def load(path: Traversable = TIERS_FILE) -> TierTable:
    """The shipped tier table. Raises ``OperationalError('tiers-missing'|'tiers-invalid')``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OperationalError(
            "tiers-missing",
            f"cannot read the tier table {path}: {exc.strerror}",
            hint="tiers.yaml ships with avm as package data (controlplane/data/); reinstall avm",
        ) from None
    return parse_tiers(data, source=str(path))
