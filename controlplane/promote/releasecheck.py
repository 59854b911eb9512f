"""Every entry of a write-once release, and the layout above it, judged against the signed bundle. Pure.

A release directory holds exactly the signed entries: regular files (by sha256), symlinks (by
target) and the directories that contain them, all owned by root, none writable by anyone,
files ``0444`` (``0555`` when the commit marks them executable), directories ``0555``. Anything
else is a finding: an entry not in the signed list (a ``__pycache__`` symlinked elsewhere, an
extra directory, a FIFO), another type, mode or owner. An entry the profile's own user owns or
can write is named as such: that user could change the code it runs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

# (where, what, expected, actual)
Problem = tuple[str, str, str | None, str | None]

ROOT_OWNED = "0 0"


def _parents(paths: Collection[str]) -> set[str]:
    out = {"."}
    for path in paths:
        parts = path.split("/")[:-1]
        out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return out


def _split(meta: str) -> tuple[str, int, str]:
    kind, mode, uid, gid = meta.split()
    return kind, int(mode, 8), f"{uid} {gid}"


def _owner_note(owner: str, agent_uids: Mapping[int, str]) -> str:
    uid = int(owner.split()[0])
    return (
        f" (owned by {agent_uids[uid]}: the profile's user could change what it runs)"
        if uid in agent_uids
        else ""
    )


def entries(
    root: str,
    signed: Mapping[str, str | None],
    executables: Collection[str] | None,
    meta: Mapping[str, str],
    agent_uids: Mapping[int, str],
) -> list[Problem]:
    """Problems with the entries of one release (content is compared elsewhere).

    ``signed`` is the bundle's file list (path -> sha256 or ``symlink:TARGET``); ``executables``
    the paths the commit marks executable, or None when the record predates it (then either
    file mode passes); ``meta`` the host's ``TYPE MODE UID GID`` per entry.
    """
    dirs = _parents(signed)
    problems: list[Problem] = []
    for rel, info in sorted(meta.items()):
        where = root if rel == "." else f"{root}/{rel}"
        if info == "?":
            problems.append((where, "release entry unreadable", "readable", None))
            continue
        kind, mode, owner = _split(info)
        want_modes: tuple[int, ...]
        if rel in dirs:
            want_kind, want_modes = "d", (0o555,)
        elif rel in signed:
            is_link = (signed[rel] or "").startswith("symlink:")
            want_kind = "l" if is_link else "f"
            if is_link:
                want_modes = (mode,)  # a symlink's own mode means nothing
            elif executables is None:
                want_modes = (0o444, 0o555)
            else:
                want_modes = (0o555,) if rel in executables else (0o444,)
        else:
            if kind == "d":  # other unexpected entries are content findings (plan.release_tampered)
                problems.append(
                    (where, "unexpected directory in release (not in the signed file list)", None, info)
                )
            continue
        if kind != want_kind:
            problems.append((where, "release entry type differs from the signed bundle", want_kind, kind))
            continue
        if owner != ROOT_OWNED:
            problems.append(
                (where, "release entry not owned by root" + _owner_note(owner, agent_uids), ROOT_OWNED, owner)
            )
        if mode not in want_modes:
            writable = " (writable)" if mode & 0o222 else ""
            want = " or ".join(f"{m:04o}" for m in want_modes)
            problems.append((where, f"release entry mode differs{writable}", want, f"{mode:04o}"))
    return problems


def container(
    where: str, info: str | None, agent_uids: Mapping[int, str], *, kind: str = "d"
) -> list[Problem]:
    """A directory (or link) above the releases must be root's and not group/other-writable."""
    if info is None or info == "?":
        return []
    got_kind, mode, owner = _split(info)
    problems: list[Problem] = []
    if got_kind != kind:
        problems.append((where, "layout entry has the wrong type", kind, got_kind))
    if owner != ROOT_OWNED:
        problems.append(
            (where, "layout entry not owned by root" + _owner_note(owner, agent_uids), ROOT_OWNED, owner)
        )
    if kind == "d" and mode & 0o022:
        problems.append(
            (where, "layout directory writable by group or others", "no group/other write", f"{mode:04o}")
        )
    return problems
