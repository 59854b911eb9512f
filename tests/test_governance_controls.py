"""The control table: one check per control, no control without a check, and no tier above L0
that passes everything because it lists nothing."""

from __future__ import annotations

from typing import get_args

import pytest
import yaml

from controlplane.errors import OperationalError
from controlplane.governance import controls as governance
from controlplane.governance import tiers

L1_CONTROLS = (
    b"controls: [signature, digest-pins, no-raw-secrets, default-deny-egress]\n"
    b"    egress_max_addresses: 65536\n"
)


def test_every_control_in_tiers_yaml_has_a_check_and_every_check_a_control() -> None:
    named = {c for t in yaml.safe_load(tiers.TIERS_FILE.read_bytes())["tiers"] for c in t["controls"]}
    assert set(governance.CHECKS) == named
    assert set(governance.CHECKS) == set(get_args(tiers.Control)) == set(tiers.CONTROLS)


def test_a_tier_above_l0_with_an_empty_control_list_is_refused_at_load() -> None:
    good = tiers.TIERS_FILE.read_bytes()
    assert L1_CONTROLS in good
    with pytest.raises(OperationalError) as caught:
        tiers.parse_tiers(good.replace(L1_CONTROLS, b"controls: []\n", 1))
    assert caught.value.code == "tiers-invalid" and caught.value.exit_code == 1
    # L0 may list none: it is the lab tier
    table = tiers.parse_tiers(good.replace(b"controls: [no-raw-secrets]", b"controls: []", 1))
    assert table.get("L0").controls == ()


def test_evaluate_refuses_a_tier_that_lists_no_control_rather_than_passing() -> None:
    l2 = tiers.load().get("L2")
    empty = l2.model_copy(update={"controls": ()})
    with pytest.raises(OperationalError) as caught:
        governance.evaluate(empty, governance.Evidence())
    assert caught.value.code == "tiers-invalid"
    assert (
        str(caught.value)
        == "[tiers-invalid] risk tier L2 lists no control, so it would pass every workload unchecked"
    )
    assert (
        governance.evaluate(tiers.load().get("L0").model_copy(update={"controls": ()}), governance.Evidence())
        == []
    )


def test_evaluate_refuses_a_control_without_a_check() -> None:
    odd = tiers.load().get("L1").model_copy(update={"controls": ("signature", "aproval")})
    with pytest.raises(OperationalError) as caught:
        governance.evaluate(odd, governance.Evidence(signature=True))
    assert caught.value.code == "tiers-invalid"
    assert caught.value.details == {"expected": list(governance.CHECKS), "actual": ["aproval"]}


@pytest.mark.parametrize("control", sorted(governance.CHECKS))
def test_each_control_is_decided_by_its_own_check_alone(control: str) -> None:
    """A tier of one control: no evidence fails it with that control's reason, and the result is
    exactly what the table's check says."""
    tier = tiers.load().get("L4").model_copy(update={"controls": (control,)})
    missing = governance.evaluate(tier, governance.Evidence())
    assert [m.control for m in missing] == [control]
    assert missing[0].reason == governance.CHECKS[control](tier, governance.Evidence())
