"""`avm receipts export --html`: a self-contained page, rendered by a real headless Chromium."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from controlplane.errors import RefusedError
from controlplane.evidence import keys, ledger
from controlplane.evidence import step as evidence
from controlplane.home import Home
from tests.plugins.require import require_tools


def chromium() -> str:
    require_tools("chromium")
    return shutil.which("chromium") or "chromium"


def make_trail(home: Home) -> None:
    keys.init(home)
    with evidence.record_step(home, "key-created") as step:
        step.subject("receipt-signing-key", keys.load_signer(home).keyid)
    with evidence.record_step(
        home, "plan", inputs={"operation": "promote", "ref": "a" * 40, "target": "demo"}
    ) as s:
        s.subject("plan", "sha256:" + "1" * 64)
    with evidence.record_step(
        home, "apply", inputs={"operation": "promote", "ref": "a" * 40, "target": "demo"}
    ) as s:
        s.subject("plan", "sha256:" + "1" * 64)
        s.result["rolled_back"] = ["canary"]
    with evidence.record_step(home, "status", inputs={"target": "demo"}) as s:
        s.subject("apply-receipt", "sha256:" + "2" * 64)
        s.result.update({"in_sync": False, "findings": [{"where": "web"}]})
    with pytest.raises(RefusedError), evidence.record_step(home, "plan", inputs={"target": "demo"}) as s:
        raise RefusedError("signature-missing", "no signature")


def render(page: Path, tmp: Path) -> tuple[str, Path]:
    browser = chromium()
    shot = tmp / "report.png"
    common = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'profile'}",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return dom, shot


def png_colours(path: Path) -> int:
    """How many distinct pixel values the screenshot has (a blank page has one)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, height = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            _width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = len(raw) // height
    return len(
        {
            raw[i : i + 4]
            for row in range(0, height, 7)
            for i in range(row * stride + 1, (row + 1) * stride - 4, 28)
        }
    )


def test_report_renders_the_timeline_with_verification_status(home: Home, tmp_path: Path) -> None:
    make_trail(home)
    page = tmp_path / "report.html"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlplane",
            "--home",
            str(home.root),
            "--json",
            "receipts",
            "export",
            "--html",
            str(page),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["html"] == {"path": str(page), "receipts": 5, "failing": 0}
    text = page.read_text()
    assert "http://" not in text.replace("http-equiv", "") and "https://" not in text  # self-contained
    dom, shot = render(page, tmp_path)
    assert dom.count('class="entry') == 5
    for kind in ("key-created", "plan", "apply", "status"):
        assert f'data-kind="{kind}"' in dom
    assert "all 5 receipts verified" in dom
    assert (
        "auto-rollback: canary" in dom and "DRIFT: 1 finding(s)" in dom and "error[signature-missing]" in dom
    )
    assert shot.stat().st_size > 5000 and png_colours(shot) > 3


def test_report_marks_exactly_the_tampered_receipt(home: Home, tmp_path: Path) -> None:
    make_trail(home)
    # edit a byte of receipt 3's payload: its signature fails; the page still renders all rows
    path = ledger.receipt_path(home.receipts, 3)
    doc = json.loads(path.read_bytes())
    doc["payload"] = doc["payload"][:40] + ("A" if doc["payload"][40] != "A" else "B") + doc["payload"][41:]
    from controlplane.canonical import canonical_bytes

    path.write_bytes(canonical_bytes(doc))
    page = tmp_path / "report.html"
    trusted = keys.load_trusted([keys.public_path(home)])
    from controlplane.evidence import report as auditreport

    counts = auditreport.write(home.receipts, trusted, page)
    assert counts == {"receipts": 5, "failing": 2}  # the edited one, and the next one's link to it
    dom, _ = render(page, tmp_path)
    assert "2 of 5 receipts FAIL verification" in dom
    assert dom.count('class="entry fail"') == 2
    assert "receipt-signature-invalid" in dom and "receipt-chain-broken" in dom
