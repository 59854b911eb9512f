"""Input documents, parsed one way: YAML or JSON -> a frozen, validated model -> or a usage error.

Every model that parses outside input derives from ``Frozen`` (immutable, unknown keys refused,
so a typo cannot silently weaken a policy). ``validate`` names the first failing field and
never echoes the input value: a manifest or spec may hold a secret where a reference belongs.
"""

from __future__ import annotations

import json
from importlib.resources.abc import Traversable
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from controlplane.errors import AvmError, UsageError

M = TypeVar("M", bound=BaseModel)


class Frozen(BaseModel):
    """The base of every validated model: frozen, ``extra="forbid"``."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def read_document(path: Traversable, *, code: str, what: str, hint: str) -> object:
    """``path`` parsed as JSON (``.json``) or YAML (anything else).

    Raises ``UsageError(code)`` when it cannot be read, decoded or parsed."""
    try:
        text = path.read_text()
        return json.loads(text) if path.name.endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise UsageError(
            code, f"cannot read {what} {path}: {exc}", hint=hint, details={"path": str(path)}
        ) from exc


def parse_yaml(data: bytes, *, code: str, source: str, error: type[AvmError] = UsageError) -> object:
    """YAML bytes parsed. Raises ``error(code)`` naming ``source`` when they do not parse."""
    try:
        return yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise error(code, f"{source} is not valid YAML: {exc}") from exc


def validate(
    model: type[M],
    raw: object,
    *,
    code: str,
    source: str,
    hint: str,
    error: type[AvmError] = UsageError,
) -> M:
    """``raw`` validated as ``model``.

    Raises ``error(code)`` naming ``source`` and the first failing field (``details``: field, and
    how many errors there were). A ``UsageError`` a validator raised itself keeps its own code and
    gets ``source`` prefixed to its message."""
    try:
        return model.model_validate(raw)
    except UsageError as exc:
        raise UsageError(exc.code, f"{source}: {exc.message}", hint=exc.hint, details=exc.details) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise error(
            code,
            f"{source}: {where}: {first['msg']}",
            hint=hint,
            details={"field": where, "errors": exc.error_count()},
        ) from None  # pydantic's error carries the input value, which may be a secret
