"""Planning is pure; facts are gathered by one real command. Drift is exactly a non-empty plan.

The plan and fact-parsing cases are data: tests/cases/plan.yaml and tests/cases/facts.yaml.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from controlplane.canonical import sha256_digest
from controlplane.errors import OperationalError
from controlplane.promote import facts as facts_mod
from controlplane.promote.facts import HostFacts, ProfileFacts, UnitFacts
from controlplane.promote.layout import LAYOUT
from controlplane.promote.plan import DesiredProfile, DesiredState, diff, release_tampered
from controlplane.transport.local import LocalTransport
from tests.plugins import cases

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
    from controlplane.promote import unitcheck

    props = {k: v.format(user=f"agent-{profile}") for k, v in unitcheck.HARDENING.items()} | changes
    return UnitFacts(
        Id=f"agent-gateway@{profile}.service",
        ActiveState=state,
        files=dict.fromkeys(unitcheck.avm_files(profile), D["unit"]),
        properties=props,
    )


def in_sync(release: str = SHA2) -> HostFacts:
    prof = ProfileFacts(
        current=LAYOUT.release_dir(release), env=D["env"], policy=D["policy"], dropin=D["dropin"], user=True
    )
    return HostFacts(
        unit_template=D["unit"],
        profiles={"zeta": prof, "alpha": prof},
        releases={release: {"app.py": D["a.py"]}},
        units={f"agent-gateway@{n}.service": hardened_unit(n) for n in ("zeta", "alpha")},
    )


TOKENS = {
    "SHA1": SHA1,
    "SHA2": SHA2,
    "REL1": LAYOUT.release_dir(SHA1),
    "REL2": LAYOUT.release_dir(SHA2),
    **{f"D.{name}": digest for name, digest in D.items()},
}
BASES = {
    "in_sync": lambda: in_sync(),
    "in_sync_v1": lambda: in_sync(SHA1),
    "template_only": lambda: HostFacts(unit_template=D["unit"]),
    "fresh": lambda: HostFacts(unit_template=None),
}


def case_facts(case: dict[str, Any]) -> HostFacts:
    base = BASES[case["base"]]().model_dump(mode="json")
    return HostFacts.model_validate(cases.merge(base, cases.expand(case.get("patch", {}), TOKENS)))


def case_desired(case: dict[str, Any]) -> DesiredState:
    want = desired()
    canary = set(case.get("canary", []))
    return want.model_copy(
        update={"profiles": tuple(p.model_copy(update={"canary": p.name in canary}) for p in want.profiles)}
    )


@pytest.mark.parametrize("case", cases.load("plan", keys={"base", "patch", "canary", "actions", "tampered"}))
def test_plan_case(case: dict[str, Any]) -> None:
    host, want = case_facts(case), case_desired(case)
    plan = diff(want, host)
    assert [f"{a.kind} {a.target}" for a in plan.actions] == cases.expand(case["actions"], TOKENS)
    assert plan.digest == diff(want, host).digest  # stable
    assert (plan.digest == diff(desired(), in_sync()).digest) == plan.empty
    found = [f"{a.target.rsplit('/', 1)[-1]} {a.expected} {a.actual}" for a in release_tampered(want, host)]
    assert found == cases.expand(case.get("tampered", []), TOKENS)


def test_real_gatherer_reads_a_host_tree_in_one_command(tmp_path: Path) -> None:
    root = str(tmp_path)
    rel = tmp_path / "opt/agent/releases" / SHA1
    (rel / "pkg").mkdir(parents=True)
    (rel / "pkg" / "app.py").write_bytes(b"a.py")
    (tmp_path / "opt/agent/profiles/alpha").mkdir(parents=True)
    os.symlink(LAYOUT.release_dir(SHA1), tmp_path / "opt/agent/profiles/alpha/current")
    (tmp_path / "etc/agent").mkdir(parents=True)
    (tmp_path / "etc/agent/alpha.env").write_bytes(b"env")
    argv = facts_mod.gather_argv(["alpha"], [SHA1], prefix=root)
    result = LocalTransport().run(argv, timeout=30).check()
    host = facts_mod.parse(result.stdout)
    assert host.profiles["alpha"].current == LAYOUT.release_dir(SHA1)
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


@pytest.mark.parametrize("case", cases.load("facts", keys={"stdout", "facts", "error"}))
def test_facts_parse_case(case: dict[str, Any]) -> None:
    """The gatherer's output parses into exactly these facts, or is refused with this code."""
    if "error" in case:
        with pytest.raises(OperationalError) as info:
            facts_mod.parse(case["stdout"])
        assert info.value.code == case["error"]
        assert info.value.details == {"stdout_head": case["stdout"][:500]}
        return
    empty = HostFacts(unit_template=None).model_dump(mode="json")
    want = cases.merge(empty, cases.expand(case["facts"], TOKENS))
    assert facts_mod.parse(cases.expand(case["stdout"], TOKENS)).model_dump(mode="json") == want
