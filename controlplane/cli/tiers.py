"""avm tiers: the risk tiers L0-L5 and the controls each one requires."""

from __future__ import annotations

from typing import Any

import click

from controlplane.cli.app import AppContext, pass_app


@click.group("tiers")
def tiers() -> None:
    """Risk tiers L0-L5 (tiers/tiers.yaml): the controls promotion and jobs enforce per tier."""


def _tier_doc(tier: Any) -> dict[str, Any]:
    from controlplane.governance.tiers import CONTROLS

    doc: dict[str, Any] = tier.model_dump(mode="json")
    doc["checks"] = {c: CONTROLS[c] for c in tier.controls}
    return doc


@tiers.command("show")
@click.argument("tier_id", required=False)
@pass_app
def show(app: AppContext, tier_id: str | None) -> None:
    """Explain every tier, or one (e.g. `avm tiers show L3`): meaning, controls and bounds."""
    from controlplane.governance import tiers as tiermod

    table = tiermod.load()
    chosen = [table.get(tier_id)] if tier_id else list(table.tiers)

    def human() -> None:
        for tier in chosen:
            click.echo(f"{tier.id}  {tier.name}: {tier.description}")
            for control in tier.controls:
                bound = ""
                if control == "approval":
                    bound = f" (approvers: {tier.approvers})"
                elif control == "canary-soak":
                    bound = f" (soak >= {tier.soak_min_s:g}s)"
                elif control == "rollback-drill" and tier.rollback_drill:
                    d = tier.rollback_drill
                    bound = f" (<= {d.max_minutes:g} min, within {d.within_days:g} days)"
                click.echo(f"    {control:<20} {tiermod.CONTROLS[control]}{bound}")
        click.echo(f"tier data: {tiermod.TIERS_FILE} ({table.digest})")

    app.emit({"tiers": [_tier_doc(t) for t in chosen], "digest": table.digest}, human)


commands = [tiers]
