"""Validated identifiers: parse at the edge so an invalid one cannot exist inside.

Each is a ``str`` subtype built through pydantic's ``Annotated`` constraints, so models that use
them validate on construction, and ``parse_*`` helpers give CLI-friendly ``UsageError``s.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler, StringConstraints
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from controlplane.errors import UsageError

# The risk tiers, one vocabulary for the tier table, release manifests and job specs.
RiskTier = Literal["L0", "L1", "L2", "L3", "L4", "L5"]
TIER_IDS: tuple[str, ...] = get_args(RiskTier)

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# A name that is safe as a path component, a systemd instance name and a Linux user suffix.
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
_JOB_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
# A profile name also becomes the Linux user ``agent-<name>``, and useradd takes at most 32
# characters: the name is validated for everything derived from it, not only for itself.
LINUX_USER_MAX = 32
PROFILE_USER_PREFIX = "agent-"
PROFILE_NAME_MAX = LINUX_USER_MAX - len(PROFILE_USER_PREFIX)
_PROFILE_RE = re.compile(rf"^[a-z0-9](?:[a-z0-9-]{{0,{PROFILE_NAME_MAX - 2}}}[a-z0-9])?$")
_PROFILE_RULE = (
    f"1-{PROFILE_NAME_MAX} of a-z 0-9 '-', starting and ending alphanumeric "
    f"(the Linux user {PROFILE_USER_PREFIX}<name> is at most {LINUX_USER_MAX} characters)"
)


def json_pattern(pattern: str) -> str:
    """``pattern`` (a Python regex used with ``fullmatch``) as a JSON Schema ``pattern`` that
    accepts exactly the same strings under both ECMA-262 and Python ``re.search`` semantics:
    anchored at both ends, and refusing the trailing newline that Python's ``$`` lets through."""
    core = pattern.removeprefix("^")
    if core.endswith("$") and not core.endswith("\\$"):
        core = core[:-1]
    return f"^(?:{core})$(?!\\n)"


@dataclasses.dataclass(frozen=True)
class JsonSchemaExtra:
    """Metadata that adds keywords to a field's exported JSON Schema, for constraints a function
    validator enforces (so an auditor's validator refuses what avm refuses)."""

    keywords: Mapping[str, Any]

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        out.update(self.keywords)
        return out


@dataclasses.dataclass(frozen=True)
class PatternCheck:
    """A pydantic validator: the whole value must match ``pattern``; the error names the field
    and, when given, the rule. The exported JSON Schema carries the same pattern."""

    pattern: re.Pattern[str]
    what: str
    rule: str = ""

    def _validate(self, value: str) -> str:
        if not self.pattern.fullmatch(value):
            rule, what = self.rule, self.what
            raise ValueError(f"{what} {value!r} is invalid: {rule}" if rule else f"invalid {what}: {value!r}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        out["pattern"] = json_pattern(self.pattern.pattern)
        return out


def pattern_validator(pattern: re.Pattern[str], what: str, rule: str = "") -> PatternCheck:
    """Every model's string patterns go through this one function (see ``PatternCheck``)."""
    return PatternCheck(pattern, what, rule)


CommitSha = Annotated[
    str,
    StringConstraints(strict=True),
    pattern_validator(_COMMIT_RE, "commit", "expected exactly 40 lowercase hex"),
]
Digest = Annotated[
    str,
    StringConstraints(strict=True),
    pattern_validator(_DIGEST_RE, "digest", "expected 'sha256:' and 64 lowercase hex"),
]
ProfileName = Annotated[
    str,
    StringConstraints(strict=True),
    pattern_validator(_PROFILE_RE, "profile name", _PROFILE_RULE),
]
VmName = Annotated[
    str,
    StringConstraints(strict=True),
    pattern_validator(_NAME_RE, "VM name", "1-32 of a-z 0-9 '-', starting and ending alphanumeric"),
]
JobId = Annotated[
    str,
    StringConstraints(strict=True),
    pattern_validator(
        _JOB_ID_RE, "job id", "1-64 of a-z 0-9 '.', '_', '-', starting and ending alphanumeric"
    ),
]


def _parse(pattern: re.Pattern[str], value: str, code: str, what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise UsageError(
            code,
            f"{what} {value!r} is invalid: {rule}",
            hint="names must be safe as path components and systemd instance names; no '/', '..' or spaces",
            details={"expected": rule, "actual": value},
        )
    return value


def parse_commit(value: str) -> str:
    return _parse(_COMMIT_RE, value, "invalid-commit", "commit", "exactly 40 lowercase hex")


def parse_digest(value: str) -> str:
    return _parse(_DIGEST_RE, value, "invalid-digest", "digest", "'sha256:' followed by 64 lowercase hex")


def parse_profile(value: str) -> str:
    return _parse(_PROFILE_RE, value, "invalid-profile-name", "profile name", _PROFILE_RULE)


def parse_vm_name(value: str) -> str:
    return _parse(_NAME_RE, value, "invalid-vm-name", "VM name", "1-32 of a-z 0-9 '-'")


def parse_job_id(value: str) -> str:
    return _parse(_JOB_ID_RE, value, "invalid-job-id", "job id", "1-64 of a-z 0-9 '.' '_' '-'")
