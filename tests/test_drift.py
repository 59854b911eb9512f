"""Drift findings say where, what, expected and actual; in sync means no findings."""

from __future__ import annotations

import pytest

from controlplane.drift import find_drift
from controlplane.facts import HostFacts, ProfileFacts, UnitFacts
from controlplane.plan import release_path
from tests.test_plan import SHA1, SHA2, D, desired, hardened_unit, in_sync


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


# --- what systemd really loads and runs, and every entry of a release (issue: drift status misses) ---

ZETA = "agent-gateway@zeta.service"
ZETA_UID = 990


def _host(**units: UnitFacts) -> HostFacts:
    host = in_sync()
    zeta = host.profiles["zeta"].model_copy(update={"uid": ZETA_UID})
    return host.model_copy(
        update={"units": {**host.units, **units}, "profiles": {**host.profiles, "zeta": zeta}}
    )


def _running(**proc: str) -> dict[str, str]:
    base = {
        "Uid": str(ZETA_UID),
        "NoNewPrivs": "1",
        "CapEff": "0" * 16,
        "Seccomp": "2",
        "cwd": release_path(SHA2),
    }
    return base | proc


UNIT_CASES: dict[str, tuple[UnitFacts, str, str | None, str | None]] = {
    "drop-in for every instance": (
        hardened_unit("zeta").model_copy(
            update={
                "files": {
                    **hardened_unit("zeta").files,
                    "/etc/systemd/system/agent-gateway@.service.d/o.conf": "x",
                }
            }
        ),
        "/etc/systemd/system/agent-gateway@.service.d/o.conf",
        None,
        "x",
    ),
    "drop-in under /run": (
        hardened_unit("zeta").model_copy(
            update={
                "files": {
                    **hardened_unit("zeta").files,
                    "/run/systemd/system/agent-gateway@zeta.service.d/r.conf": "y",
                }
            }
        ),
        "/run/systemd/system/agent-gateway@zeta.service.d/r.conf",
        None,
        "y",
    ),
    "full instance override": (
        hardened_unit("zeta").model_copy(
            update={
                "files": {
                    "/etc/systemd/system/agent-gateway@zeta.service": "z",
                    "/etc/systemd/system/agent-gateway@zeta.service.d/avm.conf": "d",
                }
            }
        ),
        "/etc/systemd/system/agent-gateway@zeta.service",
        None,
        "z",
    ),
    "User=root": (hardened_unit("zeta", User="root"), f"{ZETA} User", "agent-zeta", "root"),
    "ProtectSystem=no": (hardened_unit("zeta", ProtectSystem="no"), f"{ZETA} ProtectSystem", "strict", "no"),
    "NoNewPrivileges=no": (
        hardened_unit("zeta", NoNewPrivileges="no"),
        f"{ZETA} NoNewPrivileges",
        "yes",
        "no",
    ),
    "IPAddressDeny= emptied": (
        hardened_unit("zeta", IPAddressDeny=""),
        f"{ZETA} IPAddressDeny",
        "0.0.0.0/0 ::/0",
        "",
    ),
    "not reloaded": (
        hardened_unit("zeta").model_copy(update={"need_reload": True}),
        ZETA,
        "NeedDaemonReload=no",
        "NeedDaemonReload=yes",
    ),
    "process runs as root": (
        hardened_unit("zeta").model_copy(update={"process": _running(Uid="0")}),
        f"{ZETA} main process Uid",
        str(ZETA_UID),
        "0",
    ),
    "process runs other code": (
        hardened_unit("zeta").model_copy(update={"process": _running(cwd="/tmp/x")}),
        f"{ZETA} main process cwd",
        release_path(SHA2),
        "/tmp/x",
    ),
    "process has capabilities": (
        hardened_unit("zeta").model_copy(update={"process": _running(CapEff="000001ffffffffff")}),
        f"{ZETA} main process CapEff",
        "0" * 16,
        "000001ffffffffff",
    ),
}


@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_status_sees_the_unit_systemd_really_loads_and_runs(case: str) -> None:
    unit, where, expected, actual = UNIT_CASES[case]
    report = find_drift("demo", desired(), _host(**{ZETA: unit}), receipt="7")
    rows = {f.where: (f.expected, f.actual) for f in report.findings}
    assert rows.get(where) == (expected, actual), report.findings
    assert find_drift("demo", desired(), _host(), receipt="7").in_sync


def test_recorded_effective_properties_are_compared_one_by_one() -> None:
    from controlplane import unitcheck

    recorded = unitcheck.recorded(hardened_unit("zeta", MemoryMax="268435456", TasksMax="64"))
    expected = desired().model_copy(
        update={
            "profiles": tuple(
                p.model_copy(update={"unit": recorded}) if p.name == "zeta" else p for p in desired().profiles
            )
        }
    )
    same = find_drift(
        "demo", expected, _host(**{ZETA: hardened_unit("zeta", MemoryMax="268435456", TasksMax="64")}), "7"
    )
    assert same.in_sync, same.findings
    raised = _host(**{ZETA: hardened_unit("zeta", MemoryMax="infinity", TasksMax="64")})
    rows = {
        f.where: (f.what, f.expected, f.actual) for f in find_drift("demo", expected, raised, "7").findings
    }
    assert rows == {
        f"{ZETA} MemoryMax": ("effective unit property differs from the apply", "268435456", "infinity")
    }


def _release_host(meta: dict[str, str], content: dict[str, str | None] | None = None) -> HostFacts:
    return _host().model_copy(
        update={"release_meta": {SHA2: meta}, "releases": {SHA2: content or {"app.py": D["a.py"]}}}
    )


GOOD_META = {".": "d 0555 0 0", "app.py": "f 0444 0 0"}
RELEASE_CASES: dict[str, tuple[dict[str, str], dict[str, str | None] | None, str, str]] = {
    "symlinked directory": (
        GOOD_META | {"__pycache__": "l 0777 0 0"},
        {"app.py": D["a.py"], "__pycache__": "symlink:/elsewhere"},
        "__pycache__",
        "unexpected entry in release (not signed)",
    ),
    "chmod 666": (
        GOOD_META | {"app.py": "f 0666 0 0"},
        None,
        "app.py",
        "release entry mode differs (writable)",
    ),
    "chown to the profile user": (
        GOOD_META | {"app.py": f"f 0444 {ZETA_UID} {ZETA_UID}"},
        None,
        "app.py",
        "release entry not owned by root (owned by agent-zeta: the profile's user could change what it runs)",
    ),
    "release dir 777": (GOOD_META | {".": "d 0777 0 0"}, None, SHA2, "release entry mode differs (writable)"),
    "extra directory": (
        GOOD_META | {"lib": "d 0555 0 0"},
        None,
        "lib",
        "unexpected directory in release (not in the signed file list)",
    ),
    "a FIFO": (
        GOOD_META | {"p": "o 0644 0 0"},
        {"app.py": D["a.py"], "p": "special"},
        "p",
        "unexpected entry in release (not signed)",
    ),
}


@pytest.mark.parametrize("case", list(RELEASE_CASES))
def test_status_checks_every_release_entry(case: str) -> None:
    meta, content, leaf, what = RELEASE_CASES[case]
    report = find_drift("demo", desired(), _release_host(meta, content), receipt="7")
    found = {(f.where.rsplit("/", 1)[-1], f.what) for f in report.findings}
    assert (leaf, what) in found, report.findings
    assert find_drift("demo", desired(), _release_host(GOOD_META), receipt="7").in_sync


def test_exec_bit_is_compared_with_the_signed_commit() -> None:
    exe = desired().model_copy(update={"release_exec": {SHA2: ("app.py",)}})
    report = find_drift("demo", exe, _release_host(GOOD_META), receipt="7")
    assert [(f.where.rsplit("/", 1)[-1], f.expected, f.actual) for f in report.findings] == [
        ("app.py", "0555", "0444")
    ]


def test_a_layout_directory_the_agent_can_write_is_a_finding() -> None:
    host = _host().model_copy(
        update={"layout_meta": {"/opt/agent/releases": "d 0777 0 0", "/opt/agent": "d 0755 0 0"}}
    )
    zeta = host.profiles["zeta"].model_copy(update={"dir_meta": f"d 0755 {ZETA_UID} 0"})
    host = host.model_copy(update={"profiles": {**host.profiles, "zeta": zeta}})
    rows = {(f.where, f.what) for f in find_drift("demo", desired(), host, receipt="7").findings}
    assert rows == {
        ("/opt/agent/releases", "layout directory writable by group or others"),
        (
            "/opt/agent/profiles/zeta",
            "layout entry not owned by root"
            " (owned by agent-zeta: the profile's user could change what it runs)",
        ),
    }


def test_a_host_whose_only_apply_failed_is_compared_with_the_state_before_it() -> None:
    from controlplane.drift import against_previous

    host = _host(**{ZETA: hardened_unit("zeta", state="active")})
    back = against_previous("demo", {"zeta": release_path(SHA2), "alpha": None}, host, "4", notes=("n",))
    rows = {(f.where, f.what): (f.expected, f.actual) for f in back.findings}
    # alpha had no release before: its link and its running unit are both left over
    assert rows == {
        ("/opt/agent/profiles/alpha/current", "current link differs from before the failed apply"): (
            None,
            release_path(SHA2),
        ),
        ("agent-gateway@alpha.service", "unit state differs from before the failed apply"): (
            "not running",
            "active",
        ),
    }
    assert back.baseline == "rollback-target" and back.notes == ("n",)


def test_the_release_engineer_guide_lists_exactly_what_status_compares() -> None:
    import re
    import runpy
    from pathlib import Path

    from controlplane import unitcheck

    doc = (Path(__file__).resolve().parents[1] / "docs" / "release-engineer.md").read_text()
    section = doc[doc.index("### What status compares") : doc.index("### A host whose apply failed")]
    table = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|$", section, re.M))
    granted = {k: v.replace("{user}", "agent-<profile>") or "(empty)" for k, v in unitcheck.HARDENING.items()}
    assert table == granted
    gatherer = runpy.run_path(
        str(Path(unitcheck.__file__).parent / "scripts" / "gather_facts.py"), run_name="x"
    )
    listed = section[section.index("one by one") : section.index("the main process")]
    assert set(re.findall(r"`(\w+)`", listed)) >= set(gatherer["UNIT_PROPERTIES"])
