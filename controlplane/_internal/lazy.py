"""A package's entry points, re-exported lazily (PEP 562) so importing a package stays cheap.

Importing ``controlplane.jobs.spec`` imports ``controlplane.jobs`` first; if that package's
``__init__`` imported its entry points eagerly, every submodule would drag in the whole package
(and ``avm --help`` would load pydantic). ``exports`` gives a package ``__getattr__`` that
imports the defining submodule on first use instead; the package's ``TYPE_CHECKING`` imports
give mypy the same names with their real types.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def exports(package: str, table: Mapping[str, str]) -> Callable[[str], object]:
    """``__getattr__`` for ``package``: ``name`` -> ``getattr(package.<table[name]>, name)``."""

    def __getattr__(name: str) -> object:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
