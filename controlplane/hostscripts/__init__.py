"""Programs avm runs on a host or guest (``python3 -c`` of the file's text), as package data.

They are stdlib-only Python 3.11 (the golden image's), read with ``importlib.resources`` by
``text(name)``, and linted and type-checked like the rest of the package. They only read, or
run a probe whose every effect ends with it.
"""

from __future__ import annotations

from importlib import resources


def text(name: str) -> str:
    """The source of ``controlplane/hostscripts/<name>.py``."""
    return resources.files(__name__).joinpath(f"{name}.py").read_text(encoding="utf-8")
