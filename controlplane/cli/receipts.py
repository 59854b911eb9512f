"""avm receipts: the auditor's evidence trail."""

from __future__ import annotations

import json
from pathlib import Path

import click

from controlplane.cli.app import AppContext, pass_app


@click.group("receipts")
def receipts() -> None:
    """List, show, verify and export the signed, hash-chained evidence receipts.

    \b
    Every receipt is an in-toto Statement v1 in a DSSE envelope (ed25519), stored as
    RFC 8785 canonical JSON, carrying the sha256 of the receipt before it.
    """


@receipts.command("list")
@click.option("--last", type=click.IntRange(min=1), default=None, help="Only the last N receipts.")
@pass_app
def list_(app: AppContext, last: int | None) -> None:
    """One line per receipt: number, time, kind, status (ok, refused, failed), first subject, and
    the error code of a refused or failed step."""
    from controlplane.evidence import reader as auditlog

    rows = list(auditlog.summaries(app.home_as_is.receipts, last=last))
    if app.json:
        app.emit({"receipts": rows}, "")
        return
    if not rows:
        click.echo("no receipts yet (`avm keys init` writes the first)")
    for row in rows:
        # a refused or failed step names its error code: the reason is one `receipts show` away
        error = f"  error[{row['error']}]" if row["error"] else ""
        line = f"{row['seq']:>6}  {row['finished']}  {row['kind']:<16} {row['status']:<8} {row['subject']}"
        click.echo(line + error)


@receipts.command("show")
@click.argument("receipt_id")
@pass_app
def show(app: AppContext, receipt_id: str) -> None:
    """Print one receipt's statement. RECEIPT_ID is its number or a prefix of its digest."""
    from controlplane.evidence import reader as auditlog

    doc = auditlog.show(app.home_as_is.receipts, receipt_id)
    app.emit(doc, json.dumps(doc, indent=2, sort_keys=True))


@receipts.command("verify")
@click.option(
    "--key",
    "key_paths",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trusted public key (PEM); repeatable. [default: this home's keys/receipt-signing.pub]",
)
@click.option(
    "--dir", "directory", type=click.Path(path_type=Path, file_okay=False), help="Receipts directory."
)
@click.option("--bundle", type=click.Path(path_type=Path, dir_okay=False), help="An exported JSONL bundle.")
@click.option("--expect-head", default=None, help="The digest the chain must end at (from a trusted copy).")
@pass_app
def verify(
    app: AppContext,
    key_paths: tuple[Path, ...],
    directory: Path | None,
    bundle: Path | None,
    expect_head: str | None,
) -> None:
    """Verify every signature and the hash chain, offline. Exit 3 with a precise code on failure.

    \b
    Codes: receipt-truncated, receipt-malformed, receipt-untrusted-key,
    receipt-signature-invalid, receipt-schema-invalid,
    receipt-missing, receipt-inserted, receipt-out-of-order,
    receipt-chain-broken, receipt-head-mismatch.
    """
    from controlplane.evidence import keys
    from controlplane.evidence import verify as verifier

    home = app.home_as_is
    trusted = keys.load_trusted(list(key_paths)) if key_paths else keys.load_own_trusted(home)
    if bundle is None and directory is None:
        directory = home.receipts
    report = verifier.verify(trusted, directory=directory, bundle=bundle, expect_head=expect_head)
    app.emit(
        report.to_dict(),
        f"ok: {report.count} receipts verified, chain intact\n"
        f"head: #{report.head_seq} sha256:{report.head_digest}",
    )


@receipts.command("export")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="JSONL file to write.")
@click.option(
    "--html",
    "html_out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A self-contained HTML report for auditors: the timeline with each receipt's verification.",
)
@click.option(
    "--key",
    "key_paths",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trusted public key for the HTML report; repeatable. [default: this home's]",
)
@pass_app
def export(app: AppContext, out: Path | None, html_out: Path | None, key_paths: tuple[Path, ...]) -> None:
    """Write the chain as JSONL (--out) and/or an auditor's HTML report (--html).

    \b
    The auditor then runs, offline:
      avm receipts verify --bundle FILE --key receipt-signing.pub --expect-head DIGEST
    """
    from controlplane.errors import UsageError
    from controlplane.evidence import reader as auditlog

    if out is None and html_out is None:
        raise UsageError(
            "export-target-missing", "nothing to write", hint="pass --out FILE.jsonl and/or --html FILE"
        )
    doc: dict[str, object] = {}
    lines = []
    if out is not None:
        count, head = auditlog.export(app.home.receipts, out)
        doc.update({"out": str(out), "receipts": count, "head": head})
        lines.append(f"exported {count} receipts to {out}\nhead: sha256:{head}")
    if html_out is not None:
        from controlplane.evidence import keys
        from controlplane.evidence import report as auditreport

        trusted = keys.load_trusted(list(key_paths)) if key_paths else keys.load_own_trusted(app.home)
        counts = auditreport.write(app.home.receipts, trusted, html_out)
        doc["html"] = {"path": str(html_out), **counts}
        lines.append(
            f"wrote {html_out}: {counts['receipts']} receipts, {counts['failing']} failing verification"
        )
    app.emit(doc, "\n".join(lines))


commands = [receipts]
