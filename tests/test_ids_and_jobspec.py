"""Identifiers and the job spec are validated at the edge: bad input never becomes an object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controlplane import ids
from controlplane.cli import main
from controlplane.errors import ExitCode, UsageError
from controlplane.evidence import keys
from controlplane.home import Home
from controlplane.jobs.spec import load_jobspec, parse_jobspec
from controlplane.schemas import export_all

REPO = Path(__file__).resolve().parents[1]
PIN = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("parse", "value"),
    [
        (ids.parse_commit, "abc123"),
        (ids.parse_commit, "A" * 40),
        (ids.parse_commit, "g" * 40),
        (ids.parse_digest, "sha256:" + "0" * 63),
        (ids.parse_digest, "md5:" + "0" * 32),
        (ids.parse_profile, "../etc"),
        (ids.parse_profile, "a/b"),
        (ids.parse_profile, "x; touch /tmp/pwned"),
        (ids.parse_profile, "-rf"),
        (ids.parse_profile, ""),
        (ids.parse_profile, "a" * 27),  # agent-<27 chars> is longer than a Linux user may be
        (ids.parse_vm_name, "demo/../../root"),
        (ids.parse_job_id, "job id"),
        (ids.parse_job_id, ".hidden"),
    ],
)
def test_invalid_identifiers_are_usage_errors(parse: object, value: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(value)  # type: ignore[operator]
    assert info.value.exit_code == ExitCode.USAGE
    assert repr(value) in info.value.message


@pytest.mark.parametrize(
    ("parse", "value"),
    [
        (ids.parse_commit, "0123456789abcdef0123456789abcdef01234567"),
        (ids.parse_digest, PIN),
        (ids.parse_profile, "support-bot"),
        (ids.parse_profile, "a" * 26),  # agent-<26 chars> is exactly 32
        (ids.parse_vm_name, "demo"),
        (ids.parse_job_id, "nightly.build_7"),
    ],
)
def test_valid_identifiers_round_trip(parse: object, value: str) -> None:
    assert parse(value) == value  # type: ignore[operator]


GOOD = {"id": "hello", "image": f"busybox@{PIN}", "command": ["sh", "-c", "echo hi"]}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"image": "busybox:latest"}, "image"),
        ({"image": "busybox"}, "image"),
        ({"id": "../x"}, "id"),
        ({"outputs": ["../../etc/passwd"]}, "outputs.0"),
        ({"outputs": ["/etc/passwd"]}, "outputs.0"),
        ({"command": []}, "command"),
        ({"timeout": 0}, "timeout"),
        ({"egress": {"default": "allow"}}, "egress.default"),
        ({"egress": {"allow": [{"host": "example.com", "port": 443}]}}, "egress.allow.0.host"),
        ({"egress": {"allow": [{"host": "10.0.0.1", "port": 70000}]}}, "egress.allow.0.port"),
        ({"env": {"lower": "x"}}, "env"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_bad_job_specs_name_the_field(patch: dict[str, object], field: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_jobspec({**GOOD, **patch})
    assert info.value.code == "jobspec-invalid"
    assert info.value.details["field"] == field


def test_good_job_spec_defaults_to_deny(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"id: hello\nimage: busybox@{PIN}\ncommand: [sh, -c, 'echo hi']\n")
    spec = load_jobspec(path)
    assert spec.egress.default == "deny"
    assert spec.egress.allow == ()
    assert spec.command == ("sh", "-c", "echo hi")


def test_unparseable_job_spec_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("id: [unclosed\n")
    with pytest.raises(UsageError) as info:
        load_jobspec(path)
    assert info.value.code == "jobspec-unreadable"


def test_committed_schemas_match_the_models() -> None:
    exported = export_all()
    committed = {p.name: p.read_bytes() for p in (REPO / "receipts" / "schema").glob("*.schema.json")}
    assert set(committed) == set(exported), "run `make schemas` and commit receipts/schema/"
    for name, data in exported.items():
        assert committed[name] == data, f"{name} is stale: run `make schemas` and commit it"


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("host", "code"),
    [
        ("169.254.169.254", "egress-metadata"),
        ("0.0.0.0/0", "egress-allow-all"),
        ("2001:db8::1", "egress-ipv6-unsupported"),
        ("10.0.0.0/7", "egress-too-broad"),
        ("127.0.0.1", "egress-special-address"),
    ],
)
def test_an_unenforceable_egress_rule_is_refused_at_parse_time_with_the_home_unchanged(
    home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str, code: str
) -> None:
    """The job network's own validator runs when the spec is parsed: `avm job run` exits 64 with
    that rule's code before a receipt, a job directory or anything else exists in the home."""
    keys.init(home)  # a home that could run a job: the refusal is the spec's, not the home's
    spec = tmp_path / "job.yaml"
    spec.write_text(
        json.dumps({**GOOD, "id": "meta", "egress": {"allow": [{"host": host, "port": 80}]}}),
    )
    before = _tree(home.root)
    with pytest.raises(SystemExit) as exit_info:
        main(["--json", "job", "run", str(spec)])
    error = json.loads(capsys.readouterr().out)["error"]
    assert exit_info.value.code == 64, error
    assert error["code"] == code
    assert error["message"].startswith(f"{spec}: egress allow[0]: expected ")
    assert _tree(home.root) == before
    with pytest.raises(UsageError) as info:  # the same refusal through the model alone
        parse_jobspec(
            {**GOOD, "egress": {"allow": [{"host": "198.51.100.1", "port": 80}, {"host": host, "port": 80}]}}
        )
    assert info.value.code == code and info.value.details["index"] == 1


TOOL_PIN = "5e" * 32


def _mcp_spec(methods: list[str], tools: list[dict[str, object]]) -> dict[str, object]:
    name = {
        "host": "tools.example.test",
        "port": 443,
        "methods": methods,
        "paths": ["/mcp"],
        "mcp": {"tools": tools},
    }
    return {**GOOD, "egress": {"names": [name]}}


def test_a_job_spec_may_list_an_mcp_server_with_its_tool_pins_as_avm_yaml_does() -> None:
    spec = parse_jobspec(_mcp_spec(["POST"], [{"name": "search", "schema_sha256": TOOL_PIN}]))
    [rule] = spec.egress.policy.names
    assert rule.mcp is not None
    assert [(t.name, t.schema_sha256) for t in rule.mcp.tools] == [("search", TOOL_PIN)]


@pytest.mark.parametrize(
    ("methods", "tools", "message"),
    [
        (
            ["GET"],
            [{"name": "search", "schema_sha256": TOOL_PIN}],
            "egress tools.example.test:443 methods: expected ['POST']",
        ),
        (
            ["POST"],
            [{"name": "Bad Name", "schema_sha256": TOOL_PIN}],
            "egress mcp tool name: expected ^[a-z]",
        ),
        (
            ["POST"],
            [{"name": "search", "schema_sha256": "x"}],
            "egress mcp tool schema_sha256: expected 64 lower-case",
        ),
        (
            ["POST"],
            [{"name": "search", "schema_sha256": TOOL_PIN}] * 2,
            "egress tools.example.test:443 mcp tools: expected each tool listed once",
        ),
    ],
)
def test_an_invalid_mcp_entry_in_a_job_spec_is_refused_with_its_code(
    methods: list[str], tools: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(UsageError) as info:
        parse_jobspec(_mcp_spec(methods, tools))
    assert info.value.code == "egress-mcp-invalid"
    assert str(info.value).startswith(f"[egress-mcp-invalid] <input>: {message}"), str(info.value)
