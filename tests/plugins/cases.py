"""Data-driven test cases: YAML tables under tests/cases/, one case per entry, as pyinfra does.

A case names a base (a host in sync, a fresh host, ...) and a ``patch`` over it: mappings merge
key by key, anything else (a scalar, a list, ``null``) replaces. Strings may use tokens
(``$SHA1``, ``$D.env``, ``$REL2``, ...) for the long digests the tables would otherwise repeat;
``expand`` replaces them inside any string. A case file that does not parse, or a case with a
key the test does not read, fails the test that loads it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

CASES = Path(__file__).resolve().parents[1] / "cases"
_TOKEN = re.compile(r"\$([A-Z][A-Z0-9_]*(?:\.[a-z0-9_.]+)?)")


def load(name: str, *, keys: set[str]) -> list[Any]:
    """The cases of ``tests/cases/<name>.yaml`` as pytest params (id: the case name)."""
    doc = yaml.safe_load((CASES / f"{name}.yaml").read_text())
    assert isinstance(doc, list) and doc, f"{name}.yaml: expected a non-empty list of cases"
    out = []
    for case in doc:
        unknown = set(case) - keys - {"name"}
        assert not unknown, f"{name}.yaml: case {case.get('name')!r} has unknown keys {sorted(unknown)}"
        out.append(pytest.param(case, id=case["name"]))
    names = [p.id for p in out]
    assert len(names) == len(set(names)), f"{name}.yaml: duplicate case names"
    return out


def expand(value: Any, tokens: Mapping[str, str]) -> Any:
    """``value`` with every ``$TOKEN`` in its strings (keys included) replaced."""
    if isinstance(value, str):
        return _TOKEN.sub(lambda m: tokens[m.group(1)], value)
    if isinstance(value, list):
        return [expand(v, tokens) for v in value]
    if isinstance(value, dict):
        return {expand(k, tokens): expand(v, tokens) for k, v in value.items()}
    return value


def merge(base: Any, patch: Any) -> Any:
    """``patch`` over ``base``: mappings merge key by key; anything else replaces."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: merge(base.get(k), v) for k, v in patch.items()}}
    return patch
