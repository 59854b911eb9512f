"""The auditor's HTML report: one self-contained page, a timeline of every receipt with its
verification status.

Each receipt is checked on its own (signature by a trusted key, sequence number, link to the
receipt before it), so a damaged chain still renders and shows exactly which entries fail and
why; ``avm receipts verify`` remains the gate that stops at the first failure. The page embeds
no external resource (no scripts, fonts or styles from anywhere), so it can be archived and
opened offline years later.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controlplane._internal.fs import write_atomic
from controlplane.errors import RefusedError
from controlplane.evidence import ledger, verify
from controlplane.evidence.keys import TrustedKeys
from controlplane.evidence.receipt import digest_of

HIGHLIGHT = {
    "plan": "promotion",
    "apply": "promotion",
    "rollback-target": "promotion",
    "approval": "approval",
    "status": "drift",
    "job-run": "job",
    "job-probe-egress": "job",
    "vm-up": "vm",
    "vm-down": "vm",
}


def entries(directory: Path, trusted: TrustedKeys) -> Iterator[dict[str, Any]]:
    """One row per receipt file, verified individually (never raises for a bad receipt)."""
    prev: str | None = None
    for seq, data in ledger.iter_stored(directory):
        row: dict[str, Any] = {
            "seq": seq,
            "kind": "?",
            "status": "-",
            "time": "",
            "summary": "",
            "problems": [],
        }
        if data is None:
            row["problems"].append("receipt-missing")
            prev = None
            yield row
            continue
        row["digest"] = digest_of(data)
        try:
            statement, _ = verify.check_receipt(f"#{seq}", data, trusted)
        except RefusedError as exc:
            row["problems"].append(exc.code)
            prev = row["digest"]
            yield row
            continue
        pred = statement.predicate
        if pred.seq != seq:
            row["problems"].append("receipt-out-of-order")
        if seq > 1 and pred.prev != prev:
            row["problems"].append("receipt-chain-broken")
        prev = row["digest"]
        row.update(
            kind=pred.kind,
            status=pred.status,
            time=pred.finished,
            summary=_summary(statement.model_dump(mode="json", by_alias=True)),
        )
        yield row


def _summary(doc: dict[str, Any]) -> str:
    pred = doc["predicate"]
    inputs, result = pred.get("inputs", {}), pred.get("result", {})
    parts = [f"{s['name']}" for s in doc["subject"][:2]]
    if pred["kind"] == "status":
        parts.append(
            "in sync" if result.get("in_sync") else f"DRIFT: {len(result.get('findings', []))} finding(s)"
        )
    if pred["kind"] in ("plan", "apply", "rollback-target"):
        parts.append(
            f"{inputs.get('operation', '')} {str(inputs.get('ref', ''))[:12]} -> {inputs.get('target', '')}"
        )
    if result.get("rolled_back"):
        parts.append(f"auto-rollback: {', '.join(result['rolled_back'])}")
    if pred.get("error"):
        parts.append(f"error[{pred['error'].get('code')}]")
    return "; ".join(p for p in parts if p.strip())


CSP = "default-src 'none'; style-src 'unsafe-inline'"  # nothing loads from anywhere
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1b1f23}
h1{font-size:20px} table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
tr.fail td{background:#fde8e8} .ok{color:#12632a;font-weight:600} .bad{color:#b3261e;font-weight:600}
.tag{display:inline-block;padding:0 6px;border-radius:8px;background:#eef;font-size:12px}
code{font-size:12px}
"""


def render(rows: list[dict[str, Any]], *, source: str, keyids: list[str]) -> str:
    bad = [r for r in rows if r["problems"]]
    lines = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">",
        f"<title>avm evidence report</title><style>{STYLE}</style></head><body>",
        "<h1>avm evidence report</h1>",
        f"<p>Source: <code>{html.escape(source)}</code><br>Trusted keys: "
        + ", ".join(f"<code>{html.escape(k)}</code>" for k in keyids)
        + "</p>",
        f"<p id='verdict' class='{'bad' if bad else 'ok'}'>"
        + (
            f"{len(bad)} of {len(rows)} receipts FAIL verification"
            if bad
            else f"all {len(rows)} receipts verified: signatures and hash chain intact"
        )
        + "</p>",
        "<table id='timeline'><thead><tr><th>#</th><th>time</th><th>kind</th><th>status</th>"
        "<th>what</th><th>verification</th></tr></thead><tbody>",
    ]
    for r in rows:
        check = (
            "<span class='bad'>" + html.escape(", ".join(r["problems"])) + "</span>"
            if r["problems"]
            else "<span class='ok'>verified</span>"
        )
        tag = HIGHLIGHT.get(r["kind"], "")
        lines.append(
            f"<tr class='entry{' fail' if r['problems'] else ''}' data-kind='{html.escape(r['kind'])}'>"
            f"<td>{r['seq']}</td><td>{html.escape(r['time'])}</td>"
            f"<td>{html.escape(r['kind'])} " + (f"<span class='tag'>{tag}</span>" if tag else "") + "</td>"
            f"<td>{html.escape(r['status'])}</td><td>{html.escape(r['summary'])}</td><td>{check}</td></tr>"
        )
    lines.append("</tbody></table>")
    lines.append(
        "<script type='application/json' id='data'>"
        + html.escape(json.dumps({"receipts": len(rows), "failing": len(bad)}))
        + "</script></body></html>"
    )
    return "\n".join(lines)


def write(directory: Path, trusted: TrustedKeys, out: Path) -> dict[str, int]:
    """Write the report to ``out`` (atomically). Returns counts."""
    rows = list(entries(directory, trusted))
    page = render(rows, source=str(directory), keyids=sorted(trusted.keys))
    write_atomic(out, page.encode("utf-8"))
    return {"receipts": len(rows), "failing": sum(1 for r in rows if r["problems"])}
