"""The one wrapper of git: argv via subprocess (never a shell), ``git -C REPO``, with a timeout.

git runs non-interactively (``GIT_TERMINAL_PROMPT=0``, no pager, C locale so its messages can be
classified) and never with a user-supplied string in an option position: refs are checked
before git sees them and passed after ``--end-of-options``.

Errors are classified: a bad ref string is a ``UsageError('ref-invalid')``, a ref git does not
know is ``RefusedError('ref-unknown')``, a ref that could name more than one object is
``RefusedError('ref-ambiguous')`` and a path that is not a repository is
``UsageError('repo-not-found')``. Any other failure is a ``CommandFailed`` that keeps rc and stderr.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

from controlplane.errors import CommandFailed, CommandTimeout, OperationalError, RefusedError, UsageError

TIMEOUT_S = 120.0
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# Branches, tags, full or short SHAs and ~N / ^N suffixes. No whitespace, no shell or option
# syntax, no ranges, no reflog braces, no `:path` lookups.
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+~^-]{0,254}$")
_SHORT_HEX_RE = re.compile(r"^[0-9a-f]{4,39}$")
# The refs git tries for a short name, in its order (refs.c, ref_rev_parse_rules)
_REF_RULES = ("{}", "refs/{}", "refs/tags/{}", "refs/heads/{}", "refs/remotes/{}", "refs/remotes/{}/HEAD")
_ENV_OVERRIDES = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_PAGER": "cat",
    "GIT_OPTIONAL_LOCKS": "0",
    "LC_ALL": "C",
    "LANGUAGE": "C",
}


@dataclasses.dataclass(frozen=True)
class TreeEntry:
    """One entry of a commit's tree: git mode (e.g. ``100644``), repo-relative path, object SHA."""

    mode: str
    path: str
    sha: str

    @property
    def kind(self) -> str:
        """``blob``, ``symlink`` or ``submodule`` (``git ls-tree -r`` never lists trees)."""
        if self.mode == "120000":
            return "symlink"
        if self.mode == "160000":
            return "submodule"
        return "blob"


def check_ref(ref: str) -> str:
    """Refuse a ref that could be read as an option or carry injection, before git sees it.

    Raises ``UsageError('ref-invalid')``.
    """
    if not isinstance(ref, str) or not _REF_RE.fullmatch(ref) or ".." in ref or "//" in ref:
        raise UsageError(
            "ref-invalid",
            f"ref {ref!r} is not an acceptable git ref",
            hint="pass a branch, tag or commit SHA (letters, digits, . _ / + - ~ ^; "
            "no leading '-', spaces, ';', '..' or control characters)",
            details={"expected": "a branch, tag or commit SHA", "actual": ref},
        )
    return ref


def _check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise UsageError(
            "invalid-commit",
            f"commit {sha!r} is invalid: expected exactly 40 lowercase hex",
            hint="resolve the ref first with git.resolve()",
            details={"expected": "40 lowercase hex", "actual": sha},
        )
    return sha


def run(
    repo: Path, args: list[str], *, stdin: bytes | None = None, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[bytes]:
    """Run ``git -C REPO ARGS...`` and return the completed process, whatever its rc.

    Raises ``OperationalError('tool-missing')`` without git, ``CommandTimeout`` on timeout and
    ``UsageError('repo-not-found')`` if REPO is not a git repository.
    """
    argv = ["git", "-C", str(repo), *args]
    env = {**os.environ, **_ENV_OVERRIDES}
    try:
        proc = subprocess.run(
            argv, input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(argv, timeout, _text(exc.stdout), _text(exc.stderr)) from None
    except FileNotFoundError as exc:
        raise OperationalError(
            "tool-missing", "`git` is not installed or not on PATH", hint="install git (apt-get install git)"
        ) from exc
    if proc.returncode != 0:
        err = _text(proc.stderr)
        if "not a git repository" in err or "cannot change to" in err:
            raise UsageError(
                "repo-not-found",
                f"{repo} is not a git repository",
                hint="pass --repo with the path of the agent repository's work tree",
                details={"path": str(repo), "rc": proc.returncode, "stderr": err[-800:]},
            )
        if "dubious ownership" in err:
            raise RefusedError(
                "repo-untrusted-owner",
                f"git refuses {repo}: it is owned by another user",
                hint="run as the repository's owner, or clone it to a directory you own",
                details={"path": str(repo), "rc": proc.returncode, "stderr": err[-800:]},
            )
    return proc


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def _failed(proc: subprocess.CompletedProcess[bytes]) -> CommandFailed:
    return CommandFailed([str(a) for a in proc.args], proc.returncode, _text(proc.stdout), _text(proc.stderr))


def candidates(repo: Path, ref: str) -> list[str]:
    """Every object ``ref`` could name in ``repo``, as ``NAME: TYPE OID`` lines: each ref that
    git's lookup rules would try for it, and each object whose SHA starts with it. Empty for a
    full 40-hex SHA, which names exactly one object (git ignores refs spelled like one)."""
    base = re.split(r"[~^]", ref, maxsplit=1)[0]
    if _SHA_RE.fullmatch(base):
        return []
    wanted = [rule.format(base) for rule in _REF_RULES]
    proc = run(repo, ["for-each-ref", "--format=%(refname) %(objecttype) %(objectname)", "--", *wanted])
    if proc.returncode != 0:
        raise _failed(proc)
    found = []
    for line in _text(proc.stdout).splitlines():
        name, kind, oid = line.rsplit(" ", 2)
        if name in wanted:  # for-each-ref patterns also match refs below them (v1/x)
            found.append(f"{name}: {kind} {oid}")
    if _SHORT_HEX_RE.fullmatch(base):
        proc = run(repo, ["rev-parse", f"--disambiguate={base}"])
        oids = _text(proc.stdout).split() if proc.returncode == 0 else []
        if oids:
            check = run(
                repo,
                ["cat-file", "--batch-check=%(objectname) %(objecttype)"],
                stdin="".join(f"{oid}\n" for oid in oids).encode(),
            )
            for line in _text(check.stdout).splitlines():
                oid, _, kind = line.partition(" ")
                found.append(f"object {oid}: {kind}")
    return found


def _ambiguous(repo: Path, ref: str, found: list[str], err: str) -> RefusedError:
    warning = [ln for ln in err.splitlines() if "ambiguous" in ln]
    return RefusedError(
        "ref-ambiguous",
        f"{ref!r} names more than one object in {repo}; a promotion must name exactly one",
        hint="pass the full 40-hex commit SHA, or a full ref name such as refs/tags/NAME or refs/heads/NAME",
        details={"repo": str(repo), "ref": ref, "candidates": found or warning, "git_warning": warning},
    )


def resolve(repo: Path, ref: str) -> str:
    """The full 40-hex SHA of the one commit ``ref`` names in ``repo``.

    Raises ``UsageError('ref-invalid')`` before running git for option-like or injection-like
    refs; ``RefusedError('ref-ambiguous')``, listing the candidates, when ``ref`` could name more
    than one object (a short SHA matching several objects, a tag and a branch of the same name,
    a branch named like another commit's short SHA; git's "refname is ambiguous" warning is a
    refusal too, never dropped); ``RefusedError('ref-unknown')`` when nothing matches;
    ``UsageError('repo-not-found')``. A full 40-hex SHA always names its object.
    """
    check_ref(ref)
    proc = run(
        repo,
        [
            "-c",
            "core.warnAmbiguousRefs=true",
            "rev-parse",
            "--verify",
            "--end-of-options",
            f"{ref}^{{commit}}",
        ],
    )
    err = _text(proc.stderr)
    exact = _SHA_RE.fullmatch(re.split(r"[~^]", ref, maxsplit=1)[0]) is not None
    if proc.returncode != 0:
        details = {"repo": str(repo), "ref": ref, "rc": proc.returncode, "stderr": err[-800:]}
        if "is ambiguous" in err:
            raise _ambiguous(repo, ref, candidates(repo, ref), err)
        if proc.returncode == 128 and ("Needed a single revision" in err or "unknown revision" in err):
            raise RefusedError(
                "ref-unknown",
                f"{ref!r} does not name a commit in {repo}",
                hint="fetch the commit first, or check the branch/tag name with `git log`",
                details=details,
            )
        raise _failed(proc)
    if not exact:
        found = candidates(repo, ref)
        if len(found) > 1 or "is ambiguous" in err:
            raise _ambiguous(repo, ref, found, err)
    sha = proc.stdout.decode("ascii", "replace").strip()
    if not _SHA_RE.fullmatch(sha):
        raise OperationalError(
            "git-output-invalid",
            f"git rev-parse printed {sha!r}, not a 40-hex SHA",
            hint="SHA-256 object-format repositories are not supported",
            details={"repo": str(repo), "ref": ref},
        )
    return sha


def cat_blobs(repo: Path, names: list[str]) -> list[tuple[str, bytes] | None]:
    """Object type and content for each name (``SHA`` or ``SHA:path``), in one ``git cat-file
    --batch`` round trip; ``None`` for a name git reports missing."""
    if any("\n" in n or "\r" in n for n in names):
        raise UsageError("path-invalid", "object names must not contain newlines")
    proc = run(repo, ["cat-file", "--batch"], stdin=b"".join(n.encode() + b"\n" for n in names))
    if proc.returncode != 0:
        raise _failed(proc)
    out, pos = proc.stdout, 0
    result: list[tuple[str, bytes] | None] = []
    for _name in names:
        eol = out.index(b"\n", pos)
        header = out[pos:eol].decode("utf-8", "replace")
        pos = eol + 1
        if header.endswith(" missing") or header.endswith(" ambiguous"):
            result.append(None)
            continue
        _sha, kind, size_text = header.split(" ")
        size = int(size_text)
        result.append((kind, out[pos : pos + size]))
        pos += size + 1  # content is followed by a newline
    if pos != len(out):
        raise OperationalError(
            "git-output-invalid", f"git cat-file --batch printed {len(out) - pos} extra bytes"
        )
    return result


def read_file(repo: Path, sha: str, path: str) -> bytes | None:
    """Content of ``path`` at commit ``sha``, or ``None`` if the commit has no such file.

    Raises ``UsageError('path-invalid')`` for a path that is not a file at that commit (a
    directory or submodule) or is not repo-relative.
    """
    _check_sha(sha)
    if not path or path.startswith("/") or "\0" in path or "\n" in path:
        raise UsageError("path-invalid", f"{path!r} is not a repo-relative path", details={"actual": path})
    (found,) = cat_blobs(repo, [f"{sha}:{path}"])
    if found is None:
        return None
    kind, data = found
    if kind != "blob":
        raise UsageError(
            "path-invalid",
            f"{path} at {sha[:12]} is a {kind}, not a file",
            details={"expected": "blob", "actual": kind},
        )
    return data


def tree(repo: Path, sha: str) -> list[TreeEntry]:
    """Every file, symlink and submodule of commit ``sha`` (recursive, ``--full-tree``).

    Raises ``RefusedError('ref-unknown')`` if the commit is not in the repository and
    ``UsageError('path-not-utf8')`` for a path that is not UTF-8.
    """
    _check_sha(sha)
    proc = run(repo, ["ls-tree", "-r", "-z", "--full-tree", "--end-of-options", sha])
    if proc.returncode != 0:
        err = _text(proc.stderr)
        if "not a tree object" in err or "bad object" in err:
            raise RefusedError(
                "ref-unknown",
                f"commit {sha} is not in {repo}",
                hint="fetch the commit first",
                details={"repo": str(repo), "ref": sha, "stderr": err[-800:]},
            )
        raise _failed(proc)
    entries = []
    for record in proc.stdout.split(b"\0"):
        if not record:
            continue
        meta, _, raw_path = record.partition(b"\t")
        mode, _kind, obj = meta.decode("ascii").split(" ")
        try:
            path = raw_path.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(
                "path-not-utf8",
                f"commit {sha[:12]} has a path that is not UTF-8: {raw_path!r}",
                hint="rename the file to a UTF-8 name",
            ) from None
        entries.append(TreeEntry(mode=mode, path=path, sha=obj))
    return entries
