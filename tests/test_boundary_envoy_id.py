"""``envoy.identify``: the binary's digest is remembered next to it only while its stat is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from controlplane.boundary import envoy

VERSION_LINE = "envoy  version: abc123/1.40.0/Clean/RELEASE/BoringSSL"


def _program(path: Path, extra: str = "") -> Path:
    path.write_text(f"#!/bin/sh\necho '{VERSION_LINE}'\n{extra}")
    path.chmod(0o755)
    return path


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_first_identify_hashes_and_remembers(tmp_path: Path) -> None:
    prog = _program(tmp_path / "envoy")
    found = envoy.identify(prog)
    assert (found.sha256, found.version) == (_sha(prog), "abc123/1.40.0/Clean/RELEASE/BoringSSL")
    memo = json.loads((tmp_path / "envoy.avm-id").read_text())
    assert memo["sha256"] == _sha(prog)


def test_the_memo_is_used_while_the_stat_matches(tmp_path: Path) -> None:
    prog = _program(tmp_path / "envoy")
    envoy.identify(prog)
    memo_path = tmp_path / "envoy.avm-id"
    memo = json.loads(memo_path.read_text())
    memo["sha256"] = "sha256:" + "0" * 64  # what a second call returns only if it read the memo
    memo_path.write_text(json.dumps(memo))
    assert envoy.identify(prog).sha256 == "sha256:" + "0" * 64


def test_a_rewritten_binary_is_hashed_again(tmp_path: Path) -> None:
    prog = _program(tmp_path / "envoy")
    first = envoy.identify(prog)
    st = prog.stat()
    _program(prog, extra="# changed\n")
    os.utime(prog, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: ctime still moves
    again = envoy.identify(prog)
    assert again.sha256 == _sha(prog)
    assert again.sha256 != first.sha256


def test_an_unreadable_memo_is_ignored(tmp_path: Path) -> None:
    prog = _program(tmp_path / "envoy")
    (tmp_path / "envoy.avm-id").write_text("{not json")
    assert envoy.identify(prog).sha256 == _sha(prog)
    assert json.loads((tmp_path / "envoy.avm-id").read_text())["sha256"] == _sha(prog)
