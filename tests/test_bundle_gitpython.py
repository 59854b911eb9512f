"""GitPython as an independent oracle for avm's own git wrapper and release bundle.

avm keeps its own git code in the runtime (it detects ambiguous short SHAs and is byte-stable);
here GitPython, which shares none of that code, reads the same repositories: for a table of
trees (symlinks, executable bits, non-ASCII and long paths, empty files) and refs (branch,
annotated tag, ancestry, short SHA), the commit GitPython resolves and the files, modes, link
targets and contents it sees must be exactly what avm's bundle lists and what its tar holds.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import git as gitpython
import pytest

from controlplane.release import bundle
from controlplane.release import git as avm_git

ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}
LONG = "/".join(["d" * 40] * 4) + "/" + "f" * 60 + ".txt"  # 225 bytes: needs a PAX header
# name -> {path: (kind, content)}; kind is "file", "exec" or "link" (content = link target)
TREES: dict[str, dict[str, tuple[str, bytes]]] = {
    "plain": {"a.txt": ("file", b"a\n"), "b/c.txt": ("file", b"c\n")},
    "executable": {"run.sh": ("exec", b"#!/bin/sh\necho hi\n"), "lib.sh": ("file", b"x=1\n")},
    "symlinks": {
        "target.txt": ("file", b"t\n"),
        "link": ("link", b"target.txt"),
        "dir/up": ("link", b"../target.txt"),
        "dangling": ("link", b"does/not/exist"),
    },
    "non-ascii": {"données/été.txt": ("file", "é\n".encode()), "日本/語.md": ("file", b"x\n")},
    "long-paths": {LONG: ("file", b"long\n"), "l" * 99 + ".x": ("file", b"edge\n")},
    "empty-files": {"empty": ("file", b""), "dir/also-empty": ("exec", b"")},
    "spaces-and-dots": {
        "a b/c d.txt": ("file", b"s\n"),
        ".hidden": ("file", b"h\n"),
        "-dash": ("file", b"d\n"),
    },
    "mixed": {
        "bin/tool": ("exec", b"\x7fELF\x00\x01binary"),
        "ünï/link→": ("link", b"../bin/tool"),
        "docs/" + "n" * 120: ("file", b"long name\n"),
    },
}


def sh(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, env=ENV, check=True
    ).stdout.decode()


def make_repo(root: Path, tree: dict[str, tuple[str, bytes]]) -> tuple[Path, str, str]:
    """A repo with a first commit, then ``tree``; returns (repo, first sha, second sha)."""
    repo = root / "repo"
    repo.mkdir()
    sh(repo, "init", "-q", "-b", "main")
    (repo / "README").write_text("first\n")
    sh(repo, "add", "-A")
    sh(repo, "commit", "-qm", "first")
    first = sh(repo, "rev-parse", "HEAD").strip()
    for rel, (kind, content) in tree.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "link":
            os.symlink(content.decode(), path)
        else:
            path.write_bytes(content)
            path.chmod(0o755 if kind == "exec" else 0o644)
    sh(repo, "add", "-A")
    sh(repo, "commit", "-qm", "second")
    sh(repo, "tag", "-a", "v1", "-m", "annotated tag")
    return repo, first, sh(repo, "rev-parse", "HEAD").strip()


def oracle(repo: Path, sha: str) -> tuple[dict[str, str], dict[str, str], set[str], dict[str, bytes]]:
    """GitPython's view: (files -> sha256, symlinks -> target, executables, path -> content)."""
    commit = gitpython.Repo(repo).commit(sha)
    files: dict[str, str] = {}
    links: dict[str, str] = {}
    execs: set[str] = set()
    contents: dict[str, bytes] = {}
    for entry in commit.tree.traverse():
        item: Any = entry
        if item.type != "blob":
            continue
        data: bytes = item.data_stream.read()
        path = str(item.path)
        if item.mode == 0o120000:
            links[path] = data.decode()
        else:
            assert item.mode in (0o100644, 0o100755), (path, oct(item.mode))
            files[path] = "sha256:" + hashlib.sha256(data).hexdigest()
            contents[path] = data
            if item.mode == 0o100755:
                execs.add(path)
    return files, links, execs, contents


@pytest.mark.parametrize("name", sorted(TREES))
def test_the_bundle_lists_exactly_what_gitpython_sees(name: str, tmp_path: Path) -> None:
    repo, _, sha = make_repo(tmp_path, TREES[name])
    files, links, execs, contents = oracle(repo, sha)
    built = bundle.build(repo, sha)
    assert built.sha == sha
    assert built.files == files
    assert built.symlinks == links
    assert set(built.executables) == execs
    # and the tar itself holds exactly that: names, modes, link targets, bytes
    with tarfile.open(fileobj=io.BytesIO(built.data), mode="r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == set(files) | set(links)
        for path, member in members.items():
            if path in links:
                assert member.issym() and member.linkname == links[path]
            else:
                assert member.isfile() and member.mode == (0o755 if path in execs else 0o644)
                extracted = tar.extractfile(member)
                assert extracted is not None and extracted.read() == contents[path]
    # the tree table is what the commit holds (GitPython did not just agree with a wrong repo)
    want = {p for p, (k, _) in TREES[name].items() if k != "link"} | {"README"}
    assert set(files) == want


REFS = ["main", "HEAD", "v1", "v1~0", "refs/heads/main", "refs/tags/v1", "main~1", "HEAD^", "SHORT", "FULL"]


@pytest.mark.parametrize("ref", REFS)
def test_avm_resolves_each_ref_to_the_commit_gitpython_resolves(ref: str, tmp_path: Path) -> None:
    repo, first, second = make_repo(tmp_path, TREES["mixed"])
    spelled = {"SHORT": second[:12], "FULL": second}.get(ref, ref)
    expected = gitpython.Repo(repo).commit(spelled).hexsha
    assert avm_git.resolve(repo, spelled) == expected
    assert expected == (first if ref in ("main~1", "HEAD^") else second)
