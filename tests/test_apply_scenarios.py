"""The apply logic, scenario by scenario, against a recording transport (milliseconds each).

Canary halt, soak, automatic rollback, a host with no previous release and a failure mid-apply
are decided by ``controlplane.promote.apply`` from what the host answers; here the answers are scripted
(health by profile and commit, the effective unit read back after the health check as the JSON of
the real gatherer, built from the ``controlplane.promote.facts`` models) and every command apply sends is
recorded. What a real host does with these commands is proved by tests/test_promote_nspawn.py
and tests/test_status_nspawn.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from controlplane import hostscripts
from controlplane.canonical import sha256_digest
from controlplane.errors import AvmError, OperationalError
from controlplane.evidence.step import Step
from controlplane.promote import hostops, unitcheck
from controlplane.promote.apply import Outcome, apply_plan, capture_previous
from controlplane.promote.facts import HostFacts, ProfileFacts, UnitFacts
from controlplane.promote.layout import LAYOUT
from controlplane.promote.material import HealthCheck, Material, ProfileMaterial, ReleaseMaterial
from controlplane.promote.plan import diff
from tests.plugins.recording import RecordingTransport, Reply

OLD, NEW = "a" * 40, "b" * 40
PROFILES = ("canary", "web")
PORT = {"canary": 8101, "web": 8102}
UID = {"canary": 991, "web": 992}
UNIT = b"[Service]\n# the template this release ships\n"
OLD_UNIT = b"[Service]\n# the template on the host\n"
FILES = {"app.py": sha256_digest(b"print('v2')\n")}


@dataclasses.dataclass(frozen=True)
class Scenario:
    previous: str | None = OLD  # the release both profiles run before the apply (None: fresh host)
    health: dict[tuple[str, str], list[bool]] = dataclasses.field(default_factory=dict)  # in turn
    soak_s: float = 0.0
    unit_changes: dict[str, str] = dataclasses.field(default_factory=dict)  # the canary's, read back
    host_unit: bytes = UNIT  # the unit template on the host before the apply
    fail_put: tuple[str, int] = ("", 0)  # (profile, n): the first n puts of its env file fail
    # expected
    healthy: tuple[str, ...] = ()
    rolled_back: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    undone: tuple[str, ...] = ()
    error: tuple[str, str] | None = None  # (code, details.cause)
    current: dict[str, str | None] = dataclasses.field(default_factory=dict)  # link targets after
    failed_checks: tuple[str, ...] = ()
    host_as_before: bool = False  # every file, link and user exactly as before the apply


SCENARIOS = {
    "all healthy": Scenario(
        healthy=("canary", "web"),
        changed=("canary", "web"),
        current={"canary": LAYOUT.release_dir(NEW), "web": LAYOUT.release_dir(NEW)},
    ),
    "canary fails its health check": Scenario(
        health={("canary", NEW): [False]},
        rolled_back=("canary",),
        skipped=("web",),
        changed=("canary",),
        current={"canary": LAYOUT.release_dir(OLD), "web": LAYOUT.release_dir(OLD)},
        failed_checks=("health:canary",),
        host_as_before=True,
    ),
    "canary fails the soak": Scenario(
        health={("canary", NEW): [True, False]},
        soak_s=0.001,
        rolled_back=("canary",),
        skipped=("web",),
        changed=("canary",),
        current={"canary": LAYOUT.release_dir(OLD), "web": LAYOUT.release_dir(OLD)},
        failed_checks=("canary-soak:canary",),
        host_as_before=True,
    ),
    "the unit read back is not the hardened template": Scenario(
        unit_changes={"User": "root"},
        rolled_back=("canary",),
        skipped=("web",),
        changed=("canary",),
        current={"canary": LAYOUT.release_dir(OLD), "web": LAYOUT.release_dir(OLD)},
        failed_checks=("unit-effective:canary",),
        host_as_before=True,
    ),
    "the rollback fails too": Scenario(
        health={("canary", NEW): [False], ("canary", OLD): [False]},
        changed=("canary",),
        error=("apply-failed", "rollback-unhealthy"),
        current={"canary": LAYOUT.release_dir(OLD), "web": LAYOUT.release_dir(OLD)},
        failed_checks=("health:canary", "rollback:canary", "rollback:canary"),
    ),
    "no previous release": Scenario(
        previous=None,
        health={("canary", NEW): [False]},
        rolled_back=("canary",),
        skipped=("web",),
        changed=("canary",),
        current={"canary": None, "web": None},
        failed_checks=("health:canary",),
        host_as_before=True,
    ),
    "a step fails mid-apply: every changed profile is put back": Scenario(
        host_unit=OLD_UNIT,
        fail_put=("web", 1),
        changed=("canary", "web"),
        undone=("web", "canary"),
        error=("apply-failed", "remote-write-failed"),
        current={"canary": LAYOUT.release_dir(OLD), "web": LAYOUT.release_dir(OLD)},
        host_as_before=True,
    ),
    "a profile that cannot be put back does not stop the others": Scenario(
        fail_put=("web", 2),  # the write fails, and so does putting the old bytes back
        changed=("canary", "web"),
        undone=("canary",),
        error=("apply-failed", "remote-write-failed"),
        current={"canary": LAYOUT.release_dir(OLD), "web": LAYOUT.release_dir(OLD)},
        failed_checks=("undo:files:web",),
        host_as_before=True,  # the failed write changed nothing (puts are atomic)
    ),
}


def _material(soak_s: float) -> Material:
    def prof(name: str) -> ProfileMaterial:
        return ProfileMaterial(
            name=name,
            release=NEW,
            env=f"ENV={name}-v2\n".encode(),
            policy=b'{"tools": []}\n',
            dropin=f"[Service]\n# {name} v2\n".encode(),
            health=HealthCheck(port=PORT[name], timeout_s=1.0),
            canary=name == "canary",
            soak_s=soak_s if name == "canary" else 0.0,
        )

    rel = ReleaseMaterial(sha=NEW, bundle=b"bundle", files=FILES, bundle_digest=sha256_digest(b"bundle"))
    return Material(unit=UNIT, releases={NEW: rel}, profiles=tuple(prof(n) for n in PROFILES))


class Host:
    """The scripted host: its files (and ``current`` links, as their target) live in the fake's
    file table, its users here; the health probe and the gatherer answer from that state."""

    def __init__(self, case: Scenario) -> None:
        self.case = case
        self.users = {f"agent-{n}" for n in PROFILES} if case.previous else set()
        self.health_turn: dict[tuple[str, str], int] = {}
        files: dict[str, bytes] = {LAYOUT.unit_template: case.host_unit}
        if case.previous:
            for name in PROFILES:
                for kind in ("write-env", "write-policy", "write-dropin"):
                    files[hostops.profile_file(kind, name)[0]] = f"{kind} {name} v1\n".encode()
                files[LAYOUT.current_link(name)] = LAYOUT.release_dir(case.previous).encode()
        fail: dict[str, list[Exception]] = {}
        profile, times = case.fail_put
        if times:
            path = hostops.profile_file("write-env", profile)[0]
            fail[path] = [OperationalError("remote-write-failed", f"cannot write {path}: disk full")] * times
        self.t = RecordingTransport(
            [
                (["python3", "-c", hostscripts.text("health_probe")], self._health),
                (["python3", "-c", hostscripts.text("flip_link")], self._flip),
                (["python3", "-c", hostscripts.text("unpack_release")], self._unpack),
                (["python3", "-c", hostscripts.text("gather_facts")], self._gather),
                (["id", "-u"], lambda argv: Reply(rc=0 if argv[2] in self.users else 1)),
                (["useradd"], self._useradd),
                (["userdel"], self._userdel),
            ],
            files=files,
            fail_put=fail,
        )
        self.before = (dict(files), set(self.users))

    def facts(self) -> HostFacts:
        """The facts the plan is made from (what the gatherer reports before the apply)."""
        profiles, units = {}, {}
        if self.case.previous:
            for name in PROFILES:
                digest = {
                    k: sha256_digest(self.t.files[hostops.profile_file(k, name)[0]])
                    for k in ("write-env", "write-policy", "write-dropin")
                }
                profiles[name] = ProfileFacts(
                    current=LAYOUT.release_dir(self.case.previous),
                    env=digest["write-env"],
                    policy=digest["write-policy"],
                    dropin=digest["write-dropin"],
                    user=True,
                    uid=UID[name],
                )
                units[LAYOUT.unit_name(name)] = self._unit(name)
        return HostFacts(
            unit_template=sha256_digest(self.case.host_unit),
            profiles=profiles,
            releases={self.case.previous: {**FILES}} if self.case.previous else {},
            units=units,
        )

    def _unit(self, name: str) -> UnitFacts:
        props = {k: v.format(user=f"agent-{name}") for k, v in unitcheck.HARDENING.items()}
        if name == "canary":
            props |= self.case.unit_changes
        link = self.t.files.get(LAYOUT.current_link(name), b"").decode()
        return UnitFacts(
            Id=LAYOUT.unit_name(name),
            ActiveState="active",
            files=dict.fromkeys(unitcheck.avm_files(name), "sha256:" + "0" * 64),
            properties=props,
            process={
                "Uid": str(UID[name]),
                "NoNewPrivs": "1",
                "CapEff": "0" * 16,
                "Seccomp": "2",
                "cwd": link,
            },
        )

    def _health(self, argv: list[str]) -> Reply:
        name = next(n for n, p in PORT.items() if str(p) == argv[3])
        commit = argv[5]
        turns = self.case.health.get((name, commit), [True])
        turn = self.health_turn.get((name, commit), 0)
        self.health_turn[(name, commit)] = turn + 1
        if turns[min(turn, len(turns) - 1)]:
            return Reply(stdout=json.dumps({"commit": commit}) + "\n")
        return Reply(rc=1, stdout=json.dumps({"error": f"reports commit {OLD[:7]}"}) + "\n")

    def _flip(self, argv: list[str]) -> Reply:
        self.t.files[argv[4]] = argv[3].encode()
        return Reply()

    def _unpack(self, argv: list[str]) -> Reply:
        del self.t.files[argv[3]]  # the unpacker removes the uploaded tar
        return Reply()

    def _gather(self, argv: list[str]) -> Reply:
        request = json.loads(argv[3])
        units = {LAYOUT.unit_name(n): self._unit(n) for n in request["profiles"]}
        profiles = {
            n: ProfileFacts(current=None, env=None, policy=None, dropin=None, user=True, uid=UID[n])
            for n in request["profiles"]
        }
        return Reply(stdout=HostFacts(unit_template=None, profiles=profiles, units=units).model_dump_json())

    def _useradd(self, argv: list[str]) -> Reply:
        self.users.add(argv[-1])
        return Reply()

    def _userdel(self, argv: list[str]) -> Reply:
        self.users.discard(argv[-1])
        return Reply()


def _apply(case: Scenario) -> tuple[Host, Step, Outcome | None, AvmError | None]:
    host, material = Host(case), _material(case.soak_s)
    before = host.facts()
    plan = diff(material.desired(), before)
    step = Step("promote-apply", {})
    previous = capture_previous(host.t, material, before)
    try:
        return host, step, apply_plan(host.t, plan, material, previous, step, lambda _: None), None
    except AvmError as exc:
        return host, step, None, exc


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_apply_scenario(name: str) -> None:
    case = SCENARIOS[name]
    host, step, outcome, error = _apply(case)
    if case.error is None:
        assert error is None, error
        assert outcome is not None
        assert (tuple(outcome.healthy), tuple(outcome.rolled_back), tuple(outcome.skipped)) == (
            case.healthy,
            case.rolled_back,
            case.skipped,
        )
        assert tuple(outcome.changed) == case.changed
        assert outcome.ok == (not case.rolled_back and not case.skipped)
        assert sorted(outcome.units) == sorted(case.healthy)
    else:
        assert error is not None and (error.code, error.details["cause"]) == case.error
        want = (case.changed, case.undone)
        assert (tuple(error.details["changed"]), tuple(error.details["undone"])) == want
        assert (tuple(step.result["changed"]), tuple(step.result["undone"])) == want
    current = {n: host.t.files.get(LAYOUT.current_link(n)) for n in PROFILES}
    assert current == {n: (t.encode() if t else None) for n, t in case.current.items()}
    assert [c.name for c in step.checks if not c.ok] == list(case.failed_checks)
    if case.host_as_before:
        assert (host.t.files, host.users) == host.before
    # a profile the apply never reached was never written, restarted or flipped
    for skipped in case.skipped:
        assert not [p for p in host.t.puts() if skipped in p]
        assert not [a for a in host.t.ran("systemctl", "restart") if skipped in a[-1]]
