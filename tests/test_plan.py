"""Planning is pure; facts are gathered by one real command. Drift is exactly a non-empty plan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane import facts as facts_mod
from controlplane.canonical import sha256_digest
from controlplane.errors import OperationalError
from controlplane.facts import HostFacts, ProfileFacts, UnitFacts
from controlplane.plan import DesiredProfile, DesiredState, diff, release_path, release_tampered
from controlplane.transport.local import LocalTransport

SHA1 = "1" * 40
SHA2 = "2" * 40
D = {name: sha256_digest(name.encode()) for name in ("env", "policy", "dropin", "unit", "a.py", "b.py")}


def desired(release: str = SHA2, canary_first: bool = False) -> DesiredState:
    return DesiredState(
        unit_template=D["unit"],
        releases={release: {"app.py": D["a.py"]}},
        profiles=(
            DesiredProfile(
                name="zeta", release=release, env=D["env"], policy=D["policy"], dropin=D["dropin"]
            ),
            DesiredProfile(
                name="alpha",
                release=release,
                env=D["env"],
                policy=D["policy"],
                dropin=D["dropin"],
                canary=canary_first,
            ),
        ),
    )


def hardened_unit(profile: str, state: str = "active", **changes: str) -> UnitFacts:
    """A unit as systemd reports it with only avm's files loaded and the template's hardening."""
    from controlplane import unitcheck

    props = {k: v.format(user=f"agent-{profile}") for k, v in unitcheck.HARDENING.items()} | changes
    return UnitFacts(
        Id=f"agent-gateway@{profile}.service",
        ActiveState=state,
        files=dict.fromkeys(unitcheck.avm_files(profile), D["unit"]),
        properties=props,
    )


def in_sync(release: str = SHA2) -> HostFacts:
    prof = ProfileFacts(
        current=release_path(release), env=D["env"], policy=D["policy"], dropin=D["dropin"], user=True
    )
    return HostFacts(
        unit_template=D["unit"],
        profiles={"zeta": prof, "alpha": prof},
        releases={release: {"app.py": D["a.py"]}},
        units={f"agent-gateway@{n}.service": hardened_unit(n) for n in ("zeta", "alpha")},
    )


def test_in_sync_is_an_empty_plan_with_a_stable_digest() -> None:
    plan = diff(desired(), in_sync())
    assert plan.empty
    assert plan.digest == diff(desired(), in_sync()).digest


def kinds(plan: object) -> list[tuple[str, str]]:
    return [(a.kind, a.target) for a in plan.actions]  # type: ignore[attr-defined]


def test_fresh_host_gets_every_step_in_apply_order() -> None:
    plan = diff(desired(), HostFacts(unit_template=None))
    assert kinds(plan)[:2] == [("create-release", SHA2), ("install-unit", "agent-gateway@.service")]
    per_profile = [k for k, t in kinds(plan) if t == "alpha"]
    assert per_profile == ["create-user", "write-env", "write-policy", "write-dropin", "flip", "restart"]


def test_promoting_v2_over_v1_flips_and_restarts_only() -> None:
    host = in_sync(SHA1)
    plan = diff(desired(SHA2), host)
    assert kinds(plan) == [
        ("create-release", SHA2),
        ("flip", "alpha"),
        ("restart", "alpha"),
        ("flip", "zeta"),
        ("restart", "zeta"),
    ]


def test_canaries_are_planned_first() -> None:
    plan = diff(desired(canary_first=False), HostFacts(unit_template=D["unit"]))
    assert [t for k, t in kinds(plan) if k == "restart"] == ["alpha", "zeta"]
    want = desired()
    swapped = DesiredState(
        unit_template=want.unit_template,
        releases=want.releases,
        profiles=(want.profiles[0].model_copy(update={"canary": True}), want.profiles[1]),
    )
    plan = diff(swapped, HostFacts(unit_template=D["unit"]))
    assert [t for k, t in kinds(plan) if k == "restart"] == ["zeta", "alpha"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda f: f.model_copy(update={"unit_template": "sha256:" + "f" * 64}), "install-unit"),
        (
            lambda f: f.model_copy(
                update={
                    "profiles": {**f.profiles, "zeta": f.profiles["zeta"].model_copy(update={"env": None})}
                }
            ),
            "write-env",
        ),
        (
            lambda f: f.model_copy(
                update={
                    "profiles": {
                        **f.profiles,
                        "zeta": f.profiles["zeta"].model_copy(update={"current": release_path(SHA1)}),
                    }
                }
            ),
            "flip",
        ),
        (
            lambda f: f.model_copy(
                update={
                    "units": {
                        **f.units,
                        "agent-gateway@zeta.service": UnitFacts(
                            Id="agent-gateway@zeta.service", ActiveState="inactive"
                        ),
                    }
                }
            ),
            "restart",
        ),
    ],
)
def test_each_kind_of_drift_is_a_specific_action(mutate: object, expected: str) -> None:
    plan = diff(desired(), mutate(in_sync()))  # type: ignore[operator]
    assert not plan.empty
    assert expected in [a.kind for a in plan.actions]
    assert plan.digest != diff(desired(), in_sync()).digest


def test_tampered_release_file_is_reported_with_expected_and_actual() -> None:
    host = in_sync()
    host = host.model_copy(update={"releases": {SHA2: {"app.py": D["b.py"], "extra": D["a.py"]}}})
    found = release_tampered(desired(), host)
    assert [(a.target.rsplit("/", 1)[-1], a.expected, a.actual) for a in found] == [
        ("app.py", D["a.py"], D["b.py"]),
        ("extra", None, D["a.py"]),
    ]


def test_real_gatherer_reads_a_host_tree_in_one_command(tmp_path: Path) -> None:
    root = str(tmp_path)
    rel = tmp_path / "opt/agent/releases" / SHA1
    (rel / "pkg").mkdir(parents=True)
    (rel / "pkg" / "app.py").write_bytes(b"a.py")
    (tmp_path / "opt/agent/profiles/alpha").mkdir(parents=True)
    os.symlink(release_path(SHA1), tmp_path / "opt/agent/profiles/alpha/current")
    (tmp_path / "etc/agent").mkdir(parents=True)
    (tmp_path / "etc/agent/alpha.env").write_bytes(b"env")
    argv = facts_mod.gather_argv(["alpha"], [SHA1], prefix=root)
    result = LocalTransport().run(argv, timeout=30).check()
    host = facts_mod.parse(result.stdout)
    assert host.profiles["alpha"].current == release_path(SHA1)
    assert host.profiles["alpha"].env == D["env"]
    assert host.profiles["alpha"].dropin is None
    assert host.releases[SHA1] == {"pkg/app.py": D["a.py"]}
    assert host.unit_template is None
    # The gatherer only reads: the tree is byte-for-byte what it was.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == sorted(
        [
            "etc",
            "etc/agent",
            "etc/agent/alpha.env",
            "opt",
            "opt/agent",
            "opt/agent/profiles",
            "opt/agent/profiles/alpha",
            "opt/agent/profiles/alpha/current",
            "opt/agent/releases",
            f"opt/agent/releases/{SHA1}",
            f"opt/agent/releases/{SHA1}/pkg",
            f"opt/agent/releases/{SHA1}/pkg/app.py",
        ]
    )


def test_unparseable_facts_are_an_operational_error() -> None:
    with pytest.raises(OperationalError) as info:
        facts_mod.parse("Traceback (most recent call last): ...")
    assert info.value.code == "facts-unparseable"
