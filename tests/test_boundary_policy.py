"""The egress policy by name: valid entries parse to the exact model, invalid ones are refused
with their own code (exit 64). The cases are data: tests/cases/egress_policy.yaml."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.boundary.policy import EgressPolicy, parse_policy
from controlplane.canonical import canonical_bytes, sha256_digest
from controlplane.errors import ExitCode, UsageError
from controlplane.jobs.spec import parse_jobspec
from tests.plugins import cases

IMAGE = "busybox@sha256:" + "0" * 64


@pytest.mark.parametrize("case", cases.load("egress_policy", keys={"policy", "valid", "code"}))
def test_policy_case(case: dict[str, Any]) -> None:
    assert ("valid" in case) != ("code" in case), "a case says valid or code, not both"
    if "valid" in case:
        policy = parse_policy(case["policy"])
        assert policy.model_dump(mode="json") == {"names": case["valid"], "run_requests": None}
    else:
        with pytest.raises(UsageError) as err:
            parse_policy(case["policy"], source="spec.yaml")
        assert err.value.code == case["code"]
        assert err.value.exit_code == ExitCode.USAGE
        assert err.value.message.startswith("spec.yaml: ")


def test_generation_is_the_sha256_of_the_canonical_json() -> None:
    policy = parse_policy([{"host": "api.example.com", "methods": ["GET"], "paths": ["/"]}])
    # later fields at their defaults are left out (so the generation is the one from before them)
    entry = policy.names[0].model_dump(mode="json", exclude={"budget", "mcp", "inspect", "max_sensitivity"})
    want = sha256_digest(canonical_bytes({"names": [entry]}))
    assert policy.generation == want
    other = parse_policy([{"host": "api.example.com", "methods": ["POST"], "paths": ["/"]}])
    assert other.generation != policy.generation
    assert EgressPolicy().generation == sha256_digest(b'{"names":[]}')


def test_policy_is_frozen() -> None:
    policy = parse_policy([{"host": "api.example.com", "methods": ["GET"], "paths": ["/"]}])
    with pytest.raises(ValueError, match="frozen"):
        policy.names[0].port = 80  # type: ignore[misc]


def test_job_spec_carries_names_and_refuses_a_bad_one_with_its_code() -> None:
    names = [{"host": "api.example.test", "methods": ["GET"], "paths": ["/v1/models"]}]
    spec = parse_jobspec({"id": "j1", "image": IMAGE, "command": ["true"], "egress": {"names": names}})
    assert spec.egress.policy.names[0].host == "api.example.test"
    assert spec.egress.allow == ()
    with pytest.raises(UsageError) as err:
        parse_jobspec(
            {
                "id": "j1",
                "image": IMAGE,
                "command": ["true"],
                "egress": {"names": [{**names[0], "host": "*"}]},
            }
        )
    assert err.value.code == "egress-name-wildcard"
    # an address among the names is refused; among allow it stays the nftables rule it was
    with pytest.raises(UsageError) as err:
        parse_jobspec(
            {
                "id": "j1",
                "image": IMAGE,
                "command": ["true"],
                "egress": {"names": [{**names[0], "host": "192.0.2.1"}]},
            }
        )
    assert err.value.code == "egress-name-invalid"


def test_a_job_spec_parses_an_inspected_name_the_job_gateway_serves() -> None:
    """Tier-2 jobs are inspected too (the host gateway runs a classifier): no refusal any more."""
    name = {"host": "api.example.test", "methods": ["POST"], "paths": ["/v1/messages"]}
    inspected = {**name, "inspect": True, "max_sensitivity": "internal"}
    spec = parse_jobspec({"id": "j1", "image": IMAGE, "command": ["true"], "egress": {"names": [inspected]}})
    [rule] = spec.egress.policy.names
    assert (rule.inspect, rule.max_sensitivity) == (True, "internal")
    spec = parse_jobspec({"id": "j1", "image": IMAGE, "command": ["true"], "egress": {"names": [name]}})
    assert spec.egress.policy.names[0].inspect is False


def test_a_job_spec_lists_an_mcp_server_with_the_same_rules_as_avm_yaml() -> None:
    """A job's MCP entry is the policy model's (the host job gateway pins it); a bad one is refused
    at parse time (exit 64), never run unpinned."""
    mcp = {"host": "tools.example.test", "methods": ["POST"], "paths": ["/mcp"], "mcp": {"tools": []}}
    spec = parse_jobspec({"id": "j1", "image": IMAGE, "command": ["true"], "egress": {"names": [mcp]}})
    assert spec.egress.policy.names[0].mcp is not None and spec.egress.policy.names[0].mcp.tools == ()
    bad = {**mcp, "methods": ["GET"]}
    with pytest.raises(UsageError) as err:
        parse_jobspec({"id": "j1", "image": IMAGE, "command": ["true"], "egress": {"names": [bad]}})
    assert err.value.code == "egress-mcp-invalid"
    assert err.value.exit_code == ExitCode.USAGE
