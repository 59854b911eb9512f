"""Shell scripts avm puts inside a guest (busybox ash), as package data.

``job_init.sh`` is the Tier-2 job guest's init and ``budget.sh`` its output budget (both written
into ``/.avm`` by ``guestinit.assemble``); ``initramfs_init.sh`` is the golden VM's initramfs
``/init`` (``vm/initramfs.py`` fills in ``@SEED@``). Read with ``importlib.resources`` by
``text(name)``; ``make lint`` runs shellcheck over them, and tests pin their bytes.
"""

from __future__ import annotations

from importlib import resources


def text(name: str) -> str:
    """The text of ``controlplane/guestscripts/<name>.sh``."""
    return resources.files(__name__).joinpath(f"{name}.sh").read_text(encoding="utf-8")
