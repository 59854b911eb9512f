"""Commands that are part of the CLI contract but not built yet say so and exit 1.

They never pretend to have done anything.
"""

from __future__ import annotations

from typing import NoReturn

from controlplane.errors import OperationalError


def not_built(command: str, issue: str) -> NoReturn:
    raise OperationalError(
        "not-implemented",
        f"`avm {command}` is not implemented yet",
        hint=f"tracked in the issue for {issue}; nothing was changed",
    )
