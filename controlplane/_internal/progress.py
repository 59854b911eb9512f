"""Progress of a long step, one line at a time, to whoever asked for it.

The library never prints: a long operation takes a ``Progress`` and the CLI passes one that
writes to stderr (so ``--json`` stdout stays one document). ``quiet`` is the default.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]


def quiet(line: str) -> None:
    """Discard a progress line."""
