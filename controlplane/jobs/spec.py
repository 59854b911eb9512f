"""The Tier-2 job spec: what an ephemeral microVM job runs, and what it may reach.

Parsed at the edge (YAML or JSON) into frozen models; anything unknown or unsafe is refused
with a ``UsageError`` that names the field, before any VM, namespace or file is created.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from controlplane._internal.loading import Frozen, read_document, validate
from controlplane.boundary.policy import EgressPolicy, NameRule
from controlplane.ids import JobId, JsonSchemaExtra, RiskTier, json_pattern
from controlplane.jobs.egress import rules as nftrules

_IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}@sha256:[0-9a-f]{64}$")
_ENV_KEY_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")


def _pinned_image(value: str) -> str:
    if not _IMAGE_RE.fullmatch(value):
        raise ValueError(
            f"image {value!r} is not pinned: expected NAME@sha256:<64 hex> (tags are mutable and refused)"
        )
    return value


def _relative_inside(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or value in ("", "."):
        raise ValueError(f"path {value!r} must be relative and stay inside the job directory (no '..')")
    return value


def _env_keys(value: dict[str, str]) -> dict[str, str]:
    for key, text in value.items():
        if not _ENV_KEY_RE.fullmatch(key):
            raise ValueError(f"env name {key!r} must match {_ENV_KEY_RE.pattern}")
        _no_nul(text)
    return value


def _no_nul(value: str) -> str:
    # a NUL cannot pass through execve: it would silently cut the value short
    at = value.find("\x00")
    if at >= 0:
        raise ValueError(f"expected no NUL byte, got one at offset {at} of {value!r}")
    return value


def _host(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f"egress host {value!r} must be an IP address or CIDR; names are resolved by the operator"
        ) from None
    return value


# the exported schema carries what the validators check (ipaddress's CIDR grammar excepted)
_NO_NUL = r"[^\x00]*"
_JOB_PATH = r"(?![\s\S]*\x00)(?!/)(?!\.(?![\s\S]))(?!(?:[\s\S]*/)?\.\.(?:/|(?![\s\S])))[\s\S]+"
ImageRef = Annotated[
    str, AfterValidator(_pinned_image), JsonSchemaExtra({"pattern": json_pattern(_IMAGE_RE.pattern)})
]
JobPath = Annotated[
    str,
    AfterValidator(_relative_inside),
    AfterValidator(_no_nul),
    JsonSchemaExtra({"pattern": json_pattern(_JOB_PATH)}),
]
Arg = Annotated[str, AfterValidator(_no_nul), JsonSchemaExtra({"pattern": json_pattern(_NO_NUL)})]
MIB = 1 << 20
_HOST_SCHEMA = JsonSchemaExtra(
    {"$comment": "an IP address or CIDR as Python's ipaddress.ip_network(strict=False)"}
)
_ALLOW_SCHEMA = JsonSchemaExtra(
    {
        "$comment": "each entry is also refused (exit 64, egress-* codes) when its host is IPv6, a /0, "
        f"shorter than /{nftrules.MIN_PREFIX}, in {nftrules.METADATA} (metadata), loopback, multicast, "
        "unspecified or reserved: see controlplane.jobs.egress.rules.validate_rules"
    }
)
_ENV_SCHEMA = JsonSchemaExtra(
    {
        "propertyNames": {"pattern": json_pattern(_ENV_KEY_RE.pattern)},
        "additionalProperties": {"type": "string", "pattern": json_pattern(_NO_NUL)},
    }
)


class EgressRule(Frozen):
    """One allowed destination. Everything else is denied outside the guest."""

    host: Annotated[str, AfterValidator(_host), _HOST_SCHEMA]
    port: int = Field(ge=1, le=65535)
    proto: Literal["tcp", "udp"] = "tcp"


class RunBudget(Frozen):
    """What a job may spend through the gateway over its whole run."""

    requests: int = Field(ge=1, le=10_000_000, description="requests to all names together")


class Egress(Frozen):
    default: Literal["deny"] = "deny"
    allow: Annotated[tuple[EgressRule, ...], _ALLOW_SCHEMA] = ()

    @field_validator("allow")
    @classmethod
    def _enforceable(cls, allow: tuple[EgressRule, ...]) -> tuple[EgressRule, ...]:
        # the one validator of egress rules, the one the job network enforces: a spec that
        # parses is one whose network can be built (UsageError with its egress-* code, exit 64)
        nftrules.validate_rules(allow)
        return allow

    # HTTPS destinations by name, reached only through the egress gateway on the job's link
    names: tuple[NameRule, ...] = ()

    @field_validator("names")
    @classmethod
    def _one_policy(cls, names: tuple[NameRule, ...]) -> tuple[NameRule, ...]:
        # duplicates are refused by the policy model (egress-name-duplicate); an ``mcp:`` entry is
        # validated by it as in avm.yaml (egress-mcp-invalid) and pinned at the host's job gateway
        EgressPolicy(names=names)
        return names

    # a run-wide request budget: requests through the gateway over the whole run, all names
    # together (boundary.budget: a bucket that does not refill within any job's timeout)
    budget: RunBudget | None = None

    @model_validator(mode="after")
    def _budget_needs_names(self) -> Egress:
        if self.budget is not None and not self.names:
            raise ValueError("a run-wide budget counts requests to egress.names; this job lists none")
        if self.budget is not None:
            self.policy  # noqa: B018 (built for its validation: egress-budget-wildcard)
        return self

    @property
    def policy(self) -> EgressPolicy:
        run = self.budget.requests if self.budget is not None else None
        return EgressPolicy(names=self.names, run_requests=run)

    @property
    def networked(self) -> bool:
        """Whether the job gets a NIC at all (IP rules or names); deny-all jobs get none."""
        return bool(self.allow or self.names)


class JobInput(Frozen):
    """A host file copied into the guest at ``dest`` (relative to the job directory).

    ``src`` is relative to the spec's directory and may not leave it (checked again on the host
    after symlinks are resolved, see ``controlplane.jobinputs``)."""

    src: JobPath
    dest: JobPath


class JobLimits(Frozen):
    """What the guest may hand back. Beyond a limit the data is cut and the result says so."""

    stdio_bytes: int = Field(
        default=MIB, ge=1024, le=16 * MIB, multiple_of=1024, description="stdout and stderr, each"
    )
    output_bytes: int = Field(default=64 * MIB, ge=0, le=2048 * MIB, description="all outputs together")


class JobSpec(Frozen):
    """A Tier-2 job. ``outputs`` are paths copied out; they must stay inside the output dir."""

    id: JobId
    image: ImageRef
    command: tuple[Arg, ...] = Field(min_length=1)
    env: Annotated[dict[str, str], AfterValidator(_env_keys), _ENV_SCHEMA] = Field(default_factory=dict)
    egress: Egress = Egress()
    timeout: float = Field(default=60.0, gt=0, le=24 * 3600, description="hard deadline, seconds")
    vcpus: int = Field(default=1, ge=1, le=8)
    memory: int = Field(default=256, ge=64, le=16384, description="MiB")
    inputs: tuple[JobInput, ...] = ()
    outputs: tuple[JobPath, ...] = ()
    limits: JobLimits = JobLimits()
    risk_tier: RiskTier = "L2"


def load_jobspec(path: Path) -> JobSpec:
    """Read and validate a job spec file (YAML or JSON).

    Raises ``UsageError('jobspec-unreadable')`` if the file cannot be read or parsed, and
    ``UsageError('jobspec-invalid')`` naming the first bad field otherwise.
    """
    raw = read_document(
        path,
        code="jobspec-unreadable",
        what="job spec",
        hint="a job spec is a YAML or JSON mapping; see examples/jobs/",
    )
    return parse_jobspec(raw, source=str(path))


def parse_jobspec(raw: object, *, source: str = "<input>") -> JobSpec:
    """Validate a parsed document. Raises ``UsageError('jobspec-invalid')`` naming the first bad
    field, or the ``egress-*`` code of an allow entry the job network could not enforce."""
    return validate(
        JobSpec,
        raw,
        code="jobspec-invalid",
        source=source,
        hint="fix the field named above; unknown keys are refused so typos cannot weaken a policy",
    )
