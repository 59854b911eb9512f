"""Secrets by reference: ``secret://STORE/NAME`` is resolved at apply time, never earlier.

The one store shipped is ``local``: files under ``<home>/secrets/local/`` (directory 0700,
files 0600). A value is read only to be written to the host as a systemd credential (0600); it
never enters a plan, a receipt, a log or an error message. Missing or badly-protected secrets
refuse the promotion before the host is touched (fail closed).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane.errors import RefusedError, UsageError
from controlplane.home import Home

STORES = ("local",)


def store_dir(home: Home, store: str) -> Path:
    return home.root / "secrets" / store


def _split(ref: str) -> tuple[str, str]:
    if not ref.startswith("secret://"):
        raise UsageError("secret-ref-invalid", f"{ref!r} is not a secret://STORE/NAME reference")
    store, _, name = ref.removeprefix("secret://").partition("/")
    if store not in STORES:
        raise RefusedError(
            "secret-store-unknown",
            f"secret store {store!r} of {ref} is not configured",
            hint=f"configured stores: {', '.join(STORES)}",
            details={"expected": list(STORES), "actual": store},
        )
    if not name or ".." in name.split("/") or name.startswith("/"):
        raise UsageError("secret-ref-invalid", f"{ref!r} has an unsafe name")
    return store, name


def resolve(home: Home, ref: str) -> bytes:
    """The secret's value. Raises ``RefusedError('secret-unresolved')`` / ``('secret-exposed')``."""
    store, name = _split(ref)
    path = store_dir(home, store) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise RefusedError(
            "secret-unresolved",
            f"{ref} cannot be resolved",
            hint=f"put the value in {path} (mode 0600), e.g. `avm secrets put {ref}`",
            details={"expected": "a readable 0600 file", "actual": exc.strerror},
        ) from exc
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise RefusedError(
                "secret-exposed",
                f"{ref} is readable by group or others ({oct(stat.S_IMODE(mode))})",
                hint=f"chmod 600 {path}",
            )
        return fh.read()


def put(home: Home, ref: str, value: bytes) -> Path:
    """Store a value for ``ref`` (0600, atomic)."""
    store, name = _split(ref)
    path = store_dir(home, store) / name
    write_atomic(path, value, 0o600)
    return path


def version(home: Home, ref: str) -> str:
    """The stored version of ``ref`` for audit events: the file's mtime (ns), never the value."""
    store, name = _split(ref)
    try:
        return f"{store}:mtime-ns:{(store_dir(home, store) / name).stat().st_mtime_ns}"
    except OSError:
        return f"{store}:unknown"
