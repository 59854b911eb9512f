"""Drift findings say where, what, expected and actual; in sync means no findings."""

from __future__ import annotations

from controlplane.drift import find_drift
from controlplane.facts import ProfileFacts, UnitFacts
from controlplane.plan import release_path
from tests.test_plan import SHA1, SHA2, D, desired, in_sync


def test_in_sync_has_no_findings() -> None:
    report = find_drift("demo", desired(), in_sync(), receipt="7")
    assert report.in_sync
    assert report.profiles == ("zeta", "alpha")


def test_each_drift_is_one_finding_with_expected_and_actual() -> None:
    host = in_sync()
    host = host.model_copy(
        update={
            "releases": {SHA2: {"app.py": D["b.py"]}},
            "unit_template": D["env"],
            "profiles": {
                **host.profiles,
                "zeta": host.profiles["zeta"].model_copy(update={"current": release_path(SHA1)}),
                "stray": ProfileFacts(
                    current=release_path(SHA1), env=None, policy=None, dropin=None, user=True
                ),
            },
            "units": {
                **host.units,
                "agent-gateway@alpha.service": UnitFacts(
                    Id="agent-gateway@alpha.service", ActiveState="failed"
                ),
            },
        }
    )
    report = find_drift("demo", desired(), host, receipt="7")
    rows = {
        (f.where.rsplit("/", 1)[-1], f.what.split(":")[0]): (f.expected, f.actual) for f in report.findings
    }
    assert rows[("app.py", "release file differs from the signed bundle")] == (D["a.py"], D["b.py"])
    assert rows[("agent-gateway@.service", "unit template")] == (D["unit"], D["env"])
    assert rows[("zeta", "current link")] == (release_path(SHA2), release_path(SHA1))
    assert rows[("alpha", "unit state")] == ("active", "failed")
    assert rows[("stray", "unexpected profile (not in the last apply)")] == (None, release_path(SHA1))
    assert not report.in_sync
