"""Point a symlink at a new target atomically, run on the host as ``python3 -c <this file> TARGET LINK``.

A new link ``LINK.new`` is made next to it and renamed over ``LINK`` (``rename(2)`` replaces it
in one step), so a reader sees the old target or the new one, never no link.
"""

from __future__ import annotations

import os
import sys


def flip(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    tmp = link + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def main() -> None:
    flip(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
