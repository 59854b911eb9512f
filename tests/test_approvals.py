"""Approvals bound to a plan digest: the CLI writes them, the apply gate counts only valid ones.

The CLI runs in-process through its real entry point (``controlplane.cli.main``: the same error
boundary and exit codes as the installed ``avm``), which keeps these tests fast.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli import main
from controlplane.errors import RefusedError
from controlplane.evidence import keys
from controlplane.governance import approvals
from controlplane.home import Home

PLAN = "sha256:" + "1" * 64
OTHER = "sha256:" + "2" * 64


@dataclasses.dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


CAPTURE: list[pytest.CaptureFixture[str]] = []


def avm(home: Home, *args: str) -> Ran:
    with pytest.raises(SystemExit) as exc:
        main(["--json", "--home", str(home.root), *args])
    out = CAPTURE[-1].readouterr()
    return Ran(int(exc.value.code or 0), out.out, out.err)


@pytest.fixture
def signed_home(
    home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Home, dict[str, Path]]:
    CAPTURE.append(capsys)
    keys.init(home)
    made = {}
    for name in ("alice", "bob", "mallory"):
        _, priv, pub = approvals.init_approver(tmp_path / name)
        made[name] = priv
        if name != "mallory":  # mallory's key is never trusted
            assert avm(home, "keys", "approver-trust", str(pub)).returncode == 0
    made["promoter"] = keys.private_path(home)
    return home, made


def approve(home: Home, key: Path, plan: str = PLAN, expires: str = "1h") -> None:
    out = avm(home, "approve", "--plan", plan, "--key", str(key), "--expires", expires)
    assert out.returncode == 0, out.stdout + out.stderr


def refusal(home: Home, needed: int = 1) -> dict[str, Any]:
    with pytest.raises(RefusedError) as exc:
        approvals.require(home, PLAN, needed, why="profile gov")
    assert exc.value.code == "approval-missing" and exc.value.exit_code == 3
    return exc.value.details


def test_no_approval_is_refused(signed_home: tuple[Home, dict[str, Path]]) -> None:
    details = refusal(signed_home[0])
    assert details["actual"] == 0 and details["rejected"] == []


def test_expired_approval_is_refused(signed_home: tuple[Home, dict[str, Path]]) -> None:
    home, k = signed_home
    approve(home, k["alice"], expires="1s")
    time.sleep(1.5)
    assert [r["reason"] for r in refusal(home)["rejected"]] == ["expired"]


def test_approval_of_another_plan_does_not_apply(signed_home: tuple[Home, dict[str, Path]]) -> None:
    home, k = signed_home
    approve(home, k["alice"], plan=OTHER)
    details = refusal(home)
    assert details["other_plans"] == 1 and details["actual"] == 0


def test_the_promoter_cannot_approve_their_own_plan(signed_home: tuple[Home, dict[str, Path]]) -> None:
    home, k = signed_home
    approve(home, k["promoter"])  # signing works; it just never counts
    assert [r["reason"] for r in refusal(home)["rejected"]] == ["by-promoter"]
    trust = avm(home, "keys", "approver-trust", str(keys.public_path(home)))
    assert trust.returncode == 3 and json.loads(trust.stdout)["error"]["code"] == "approver-is-promoter"


def test_untrusted_approver_is_refused(signed_home: tuple[Home, dict[str, Path]]) -> None:
    home, k = signed_home
    approve(home, k["mallory"])
    assert [r["reason"] for r in refusal(home)["rejected"]] == ["untrusted-approver"]


def test_distinct_approvers_are_counted_once_each(signed_home: tuple[Home, dict[str, Path]]) -> None:
    home, k = signed_home
    approve(home, k["alice"])
    approve(home, k["alice"])
    assert refusal(home, needed=2)["actual"] == 1  # the same approver twice is one approver
    approve(home, k["bob"])
    found = approvals.require(home, PLAN, 2, why="profile gov")
    assert len({a.approver for a in found}) == 2


def test_a_forged_approval_envelope_is_refused(signed_home: tuple[Home, dict[str, Path]]) -> None:
    home, k = signed_home
    _, envelope = approvals.sign(k["alice"], OTHER, 3600)
    _, genuine = approvals.sign(k["alice"], PLAN, 3600)
    envelope["signatures"] = genuine["signatures"]  # alice's signature, presented over other bytes
    trusted = approvals._trusted(home)
    assert (
        approvals._judge(envelope, trusted, keys.load_signer(home).keyid, approvals._now())[1]
        == "bad-signature"
    )


@pytest.mark.parametrize("text", ["0h", "24", "1y", "31d", "-1h"])
def test_bad_expiry_is_a_usage_error(text: str, signed_home: tuple[Home, dict[str, Path]]) -> None:
    home, k = signed_home
    out = avm(home, "approve", "--plan", PLAN, "--key", str(k["alice"]), "--expires", text)
    assert out.returncode == 64 and json.loads(out.stdout)["error"]["code"] in ("expires-invalid", "usage")


def test_the_scan_stops_at_receipts_older_than_any_approval_can_live(
    signed_home: tuple[Home, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt

    home, k = signed_home
    approve(home, k["alice"], expires="30d")
    assert len(approvals.find(home, PLAN)[0]) == 1
    later = approvals._now() + dt.timedelta(days=32)
    monkeypatch.setattr(approvals, "_now", lambda: later)
    assert approvals.find(home, PLAN) == ([], [], 0)  # expired by then anyway; never even read
