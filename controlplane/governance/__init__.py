"""Governance: risk tiers L0-L5 as enforced gates over both tiers of workload.

* ``tiers``: the tier table (package data ``tiers.yaml``) and its controls.
* ``controls``: one check per control, in a table, evaluated against a release or a job spec.
* ``gate``: the promote/job gate that applies a tier's controls and records the decision.
* ``approvals``: approvals bound to one plan digest (distinct keys, expiry, not the promoter).
* ``secrets`` / ``secretscan``: secrets by reference (``secret://local/NAME``) and the scan
  that keeps values out of manifests, plans and receipts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane._internal.lazy import exports

if TYPE_CHECKING:
    from controlplane.governance.approvals import Approval
    from controlplane.governance.gate import check_approvals, check_tiers
    from controlplane.governance.tiers import TierTable

__all__ = ["Approval", "TierTable", "check_approvals", "check_tiers"]
__getattr__ = exports(
    __name__,
    {"TierTable": "tiers", "check_tiers": "gate", "check_approvals": "gate", "Approval": "approvals"},
)
