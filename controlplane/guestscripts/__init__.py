"""Shell scripts avm puts inside a guest (busybox ash), as package data.

``job_init.sh`` is the Tier-2 job guest's init and ``budget.sh`` its output budget (both written
into ``/.avm`` by ``guestinit.assemble``); ``initramfs_init.sh`` is the golden VM's initramfs
``/init`` (``vm/initramfs.py`` fills in ``@SEED@`` and ``@PLACEHOLDER@``). The warm-start
identity gate the initramfs installs into a golden VM is ``identity_gate.py`` with its unit
``avm-identity.service``, the sshd drop-in ``sshd-avm.conf``, ``avm-first.conf`` (ssh.service
at nice -10) and ``avm-session-priority.conf`` (its sessions back at 0), read with
``data(filename)``. Read with
``importlib.resources`` by ``text(name)``; ``make lint`` runs shellcheck over them, and tests
pin their bytes.
"""

from __future__ import annotations

from importlib import resources


def text(name: str) -> str:
    """The text of ``controlplane/guestscripts/<name>.sh``."""
    return resources.files(__name__).joinpath(f"{name}.sh").read_text(encoding="utf-8")


def data(filename: str) -> bytes:
    """The bytes of ``controlplane/guestscripts/<filename>`` (any guest file, not only scripts)."""
    return resources.files(__name__).joinpath(filename).read_bytes()
