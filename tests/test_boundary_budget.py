"""Budgets and usage at the gateway, for real: Envoy from the pinned wheel, real TLS, a real upstream.

The namespaces and the upstream are tests/plugins/boundarynet.py's (the agent's namespace has no
route anywhere; its only way out is the gateway's listener). A spent budget is a 429 that Envoy
answers itself with a JSON reason, and nothing reaches the upstream; usage (requests, body bytes,
the upstream's token counts) is read back from the gateway's access log.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.boundary import budget, events, usage
from controlplane.boundary.policy import EgressPolicy, parse_policy
from controlplane.boundary.render import render
from controlplane.errors import UsageError
from controlplane.jobs.spec import parse_jobspec
from tests.plugins.boundarynet import SECOND_NAME as OTHER
from tests.plugins.boundarynet import BoundaryNet
from tests.plugins.upstream_server import STREAM_OUTPUT
from tests.test_boundary_gateway import HOST, Setup


@pytest.fixture
def bud(boundary_net: BoundaryNet) -> Iterator[Setup]:
    s = Setup(boundary_net)
    with s.gw:
        yield s


def budgeted(port: int, rpm: int | None = None, run: int | None = None) -> EgressPolicy:
    entry: dict[str, Any] = {
        "host": HOST,
        "port": port,
        "methods": ["GET", "POST"],
        "paths": ["/v1/*"],
    }
    if rpm is not None:
        entry["budget"] = {"requests_per_minute": rpm}
    raw: dict[str, Any] = {"names": [entry]}
    if run is not None:
        raw["names"].append({"host": OTHER, "port": port, "methods": ["GET"], "paths": ["/v1/*"]})
        raw["run_requests"] = run
    return parse_policy(raw)


def refused(pol: EgressPolicy, budget: str, destination: str) -> dict[str, Any]:
    return {
        "budget": budget,
        "denied": True,
        "destination": destination,
        "policy": pol.generation,
        "reason": "budget-exhausted",
    }


def test_a_spent_per_minute_budget_is_a_429_with_the_reason_and_reaches_nothing(bud: Setup) -> None:
    pol = budgeted(bud.port, rpm=2)
    bud.gw.start(bud.spec(pol))
    assert [bud.get("/v1/models").status for _ in range(2)] == [200, 200]
    third = bud.get("/v1/models")
    assert third.status == 429
    assert third.headers["content-type"] == "application/json"
    assert third.json() == refused(pol, "requests_per_minute", f"{HOST}:{bud.port}")
    assert len(bud.net.upstream_requests()) == 2
    logged = events.read(bud.gw.access_log, timeout=5.0, want=3)
    assert [(e.event, e.code, e.reason, e.budget) for e in logged] == [
        ("egress.allowed", 200, "allowed", ""),
        ("egress.allowed", 200, "allowed", ""),
        ("egress.denied", 429, "budget-exhausted", "requests_per_minute"),
    ]


def test_a_byte_budget_counts_request_bodies_chunked_or_not(bud: Setup) -> None:
    pol = parse_policy(
        [
            {
                "host": HOST,
                "port": bud.port,
                "methods": ["GET", "POST"],
                "paths": ["/v1/*"],
                "budget": {"request_bytes_per_minute": 300},
            }
        ]
    )
    bud.gw.start(bud.spec(pol))

    def post(body: bytes, chunked: bool = False) -> Any:
        return bud.client.https("10.77.0.1", bud.port, HOST, "POST", "/v1/upload", {}, body, chunked)

    too_big = post(b"x" * 301)  # larger than the whole budget: never sent
    assert too_big.status == 413
    assert too_big.json() == refused(pol, "request_bytes_per_minute", f"{HOST}:{bud.port}")
    first, second = post(b"a" * 120), post(b"b" * 120, chunked=True)
    assert (first.status, second.status) == (200, 200)
    third = post(b"c" * 61)  # 120 + 120 + 61 > 300
    assert third.status == 429
    assert third.json() == refused(pol, "request_bytes_per_minute", f"{HOST}:{bud.port}")
    assert post(b"").status == 429  # content-length: 0 declares a body: refused once spent
    # a request without a body takes nothing: the spent budget does not stop it
    assert [bud.get("/v1/models").status for _ in range(3)] == [200, 200, 200]
    seen = bud.net.upstream_requests()
    assert [r["body"] for r in seen] == ["a" * 120, "b" * 120, "", "", ""]  # the chunked one whole
    logged = events.read(bud.gw.access_log, timeout=5.0, want=8)
    # bytes_sent is what the agent sent the gateway: a refused body counts, though never forwarded
    assert [(e.code, e.reason, e.budget, e.bytes_sent) for e in logged] == [
        (413, "budget-exhausted", "request_bytes_per_minute", 301),
        (200, "allowed", "", 120),
        (200, "allowed", "", 120),
        (429, "budget-exhausted", "request_bytes_per_minute", 61),
        (429, "budget-exhausted", "request_bytes_per_minute", 0),
        (200, "allowed", "", 0),
        (200, "allowed", "", 0),
        (200, "allowed", "", 0),
    ]


def test_an_upstream_cannot_forge_the_budget_header(bud: Setup) -> None:
    # the test upstream sends x-avm-budget on every answer: the gateway removes it
    bud.gw.start(bud.spec(budgeted(bud.port, rpm=5)))
    resp = bud.get("/v1/models")
    assert resp.status == 200
    assert "x-avm-budget" not in resp.headers


def test_a_run_wide_budget_counts_every_destination_together(bud: Setup) -> None:
    pol = budgeted(bud.port, run=3)
    spec = bud.spec(pol)
    upstream = spec.upstreams[f"{HOST}:{bud.port}"]
    spec = type(spec)(**{**spec.__dict__, "upstreams": {**spec.upstreams, f"{OTHER}:{bud.port}": upstream}})
    bud.gw.start(spec)
    codes = [
        bud.get("/v1/models").status,
        bud.client.https("10.77.0.1", bud.port, OTHER, "GET", "/v1/models").status,
        bud.get("/v1/models").status,
    ]
    assert codes == [200, 200, 200]
    fourth = bud.client.https("10.77.0.1", bud.port, OTHER, "GET", "/v1/models")
    fifth = bud.get("/v1/models")
    assert (fourth.status, fifth.status) == (429, 429)
    assert fourth.json() == refused(pol, "requests", OTHER)
    assert fifth.json() == refused(pol, "requests", HOST)
    assert len(bud.net.upstream_requests()) == 3
    logged = events.read(bud.gw.access_log, timeout=5.0, want=5)
    assert [(e.host, e.event, e.reason, e.budget) for e in logged] == [
        (HOST, "egress.allowed", "allowed", ""),
        (OTHER, "egress.allowed", "allowed", ""),
        (HOST, "egress.allowed", "allowed", ""),
        (OTHER, "egress.denied", "budget-exhausted", "requests"),
        (HOST, "egress.denied", "budget-exhausted", "requests"),
    ]


def test_usage_counts_requests_bytes_denials_and_the_upstreams_tokens(bud: Setup) -> None:
    pol = budgeted(bud.port)
    bud.gw.start(bud.spec(pol))
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
    msg = json.dumps({"model": "m", "max_tokens": 9}).encode()
    stream = json.dumps({"model": "m", "stream": True}).encode()
    answers = [
        bud.client.https("10.77.0.1", bud.port, HOST, "POST", "/v1/chat/completions", {}, chat),
        bud.client.https("10.77.0.1", bud.port, HOST, "POST", "/v1/messages", {}, msg),
        bud.client.https("10.77.0.1", bud.port, HOST, "POST", "/v1/messages", {}, stream),
        bud.get("/v1/models"),  # no usage object
        bud.get("/v1/models", "DELETE"),  # denied: method-not-allowed
    ]
    assert [a.status for a in answers] == [200, 200, 200, 200, 403]
    assert answers[0].json()["usage"]["prompt_tokens"] == len(chat)
    assert answers[2].headers["content-type"] == "text/event-stream"
    logged = events.read(bud.gw.access_log, timeout=5.0, want=5)
    assert [(e.input_tokens, e.output_tokens) for e in logged] == [
        (len(chat), 7),
        (len(msg), 5),
        (len(stream), STREAM_OUTPUT),
        (None, None),
        (None, None),
    ]
    assert [e.bytes_sent for e in logged] == [len(chat), len(msg), len(stream), 0, 0]
    assert [e.bytes_received for e in logged] == [len(a.body) for a in answers]
    [row] = usage.report(logged)["rows"]
    assert {k: v for k, v in row.items() if k not in ("first", "last")} == {
        "identity": "test:agent",
        "destination": HOST,
        "requests": 5,
        "allowed": 4,
        "denied": 1,
        "denied_by": {"method-not-allowed": 1},
        "bytes_sent": len(chat) + len(msg) + len(stream),
        "bytes_received": sum(len(a.body) for a in answers),
        "input_tokens": len(chat) + len(msg) + len(stream),
        "output_tokens": 7 + 5 + STREAM_OUTPUT,
    }


# --- the rendering and the model (no Envoy running) ---------------------------------------------


def _chain_filters(rendered: Any, listener: str) -> list[str]:
    [lis] = [x for x in rendered.lds["resources"] if x["name"] == listener]
    hcm = lis["filter_chains"][0]["filters"][0]["typed_config"]
    return [f["name"] for f in hcm["http_filters"]]


def test_a_destination_budget_is_the_first_filter_so_a_refused_request_gets_no_credential() -> None:
    from tests.test_boundary_render import spec

    base = spec()
    alpha = base.listeners[0]
    entries = [r.model_dump(mode="json", exclude_none=True) for r in alpha.policy.names]
    entries[0]["budget"] = {"requests_per_minute": 30}
    pol = parse_policy(entries)
    rendered = render(dataclasses.replace(base, listeners=(dataclasses.replace(alpha, policy=pol),)))
    assert _chain_filters(rendered, "profile:alpha/443") == [
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.rbac",
        "envoy.filters.http.credential_injector",
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]
    [lis] = rendered.lds["resources"]
    bucket = lis["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
    assert bucket["token_bucket"] == {"max_tokens": 30, "tokens_per_fill": 30, "fill_interval": "60s"}
    assert bucket["status"] == {"code": 429}
    # the other destination has no budget: no bucket
    hcm2 = lis["filter_chains"][1]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm2["http_filters"]] == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]


def test_a_run_wide_budget_routes_every_chain_through_one_bucket_and_envoy_accepts_it(
    tmp_path: Path,
) -> None:
    from controlplane.boundary import envoy
    from controlplane.boundary.ca import EgressCA
    from tests.test_boundary_render import spec

    ca = EgressCA.ensure(tmp_path / "ca")
    hosts = ("api.example.com", "pypi.example.org", "*.github.example")
    (tmp_path / "secrets").mkdir()
    for name in ("anthropic", "gh"):
        (tmp_path / "secrets" / name).write_bytes(b"x")
    base = spec(tmp_path, ca.cert_path, {h: ca.leaf(h) for h in hosts})
    alpha = base.listeners[0]
    # the largest budgets the model accepts: Envoy must accept them too (its buckets are uint32)
    biggest = {"requests_per_minute": 100_000, "request_bytes_per_minute": (1 << 32) - 1}
    entries = [r.model_dump(mode="json", exclude_none=True) for r in alpha.policy.names]
    entries = [{**e, "budget": biggest} for e in entries]
    pol = EgressPolicy(names=parse_policy(entries).names, run_requests=10_000_000)
    job = dataclasses.replace(alpha, identity="job:j-7", policy=pol)
    rendered = render(dataclasses.replace(base, listeners=(job, base.listeners[1])))
    hop = budget.internal_name("job:j-7")
    [inner] = [x for x in rendered.lds["resources"] if x["name"] == hop]
    [outer] = [x for x in rendered.lds["resources"] if x["name"] == "job:j-7/443"]
    for chain in outer["filter_chains"]:
        vhost = chain["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
        assert {r["route"]["cluster"] for r in vhost["routes"] if "route" in r} == {hop}
    hcm = inner["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][0]["typed_config"]["token_bucket"] == {
        "max_tokens": 10_000_000,
        "tokens_per_fill": 10_000_000,
        "fill_interval": budget.RUN_FILL,
    }
    assert sorted(v["domains"][0] for v in hcm["route_config"]["virtual_hosts"]) == [
        "api.example.com",
        "pypi.example.org",
    ]
    assert hop in [c["name"] for c in rendered.cds["resources"]]
    envoy.validate(rendered)  # raises gateway-config-invalid if Envoy refuses it


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        ({"requests_per_minute": 0}, "egress-policy-invalid", "names.0.budget.requests_per_minute"),
        ({"requests_per_minute": 100_001}, "egress-policy-invalid", "names.0.budget.requests_per_minute"),
        ({"requests_per_minute": "ten"}, "egress-policy-invalid", "names.0.budget.requests_per_minute"),
        ({"requests_per_minute": 5, "tokens": 9}, "egress-policy-invalid", "names.0.budget.tokens"),
        ({"request_bytes_per_minute": 0}, "egress-policy-invalid", "names.0.budget.request_bytes_per_minute"),
        (
            {"request_bytes_per_minute": 1 << 32},
            "egress-policy-invalid",
            "names.0.budget.request_bytes_per_minute",
        ),
        ({}, "egress-policy-invalid", "budget"),
    ],
)
def test_a_bad_budget_is_refused_with_exit_64(raw: dict[str, Any], code: str, field: str) -> None:
    entry = {"host": HOST, "methods": ["GET"], "paths": ["/"], "budget": raw}
    with pytest.raises(UsageError) as err:
        parse_policy([entry])
    assert (err.value.code, err.value.exit_code) == (code, 64)
    assert field in str(err.value)


def test_a_job_budget_is_validated_in_the_job_spec() -> None:
    base = {"id": "j1", "image": "x@sha256:" + "a" * 64, "command": ["true"]}
    names = [{"host": HOST, "methods": ["GET"], "paths": ["/"]}]
    spec = parse_jobspec({**base, "egress": {"names": names, "budget": {"requests": 3}}})
    assert spec.egress.policy.run_requests == 3
    assert (
        spec.egress.policy.generation
        != parse_jobspec({**base, "egress": {"names": names}}).egress.policy.generation
    )
    bad = [
        ({"names": names, "budget": {"requests": 0}}, "jobspec-invalid"),
        ({"budget": {"requests": 3}}, "jobspec-invalid"),  # nothing to count
        (
            {
                "names": [{"host": "*.example.test", "methods": ["GET"], "paths": ["/"]}],
                "budget": {"requests": 3},
            },
            "egress-budget-wildcard",
        ),
    ]
    for egress, code in bad:
        with pytest.raises(UsageError) as err:
            parse_jobspec({**base, "egress": egress})
        assert (err.value.code, err.value.exit_code) == (code, 64)


def test_a_policy_without_budgets_keeps_its_generation() -> None:
    # pinned: what main computed for this policy before budgets, MCP servers and inspection
    # existed (a gateway in force keeps it)
    pol = parse_policy([{"host": HOST, "methods": ["GET"], "paths": ["/"]}])
    assert pol.generation == "sha256:080f01bd01a710dc44f7978773ba383022081cefd5a841c5c3ca990166fe4713"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            {"identity": "test:a", "code": 429, "budget": "requests", "reason": "allowed", "flags": "-"},
            ("egress.denied", "budget-exhausted", "requests"),
        ),
        (  # an upstream's own 429 is the upstream's answer, not a budget
            {"identity": "test:a", "code": 429, "budget": None, "reason": "allowed", "flags": "-"},
            ("egress.allowed", "allowed", ""),
        ),
        (
            {"identity": "test:a", "code": 200, "budget": "requests", "reason": "allowed", "flags": "-"},
            ("egress.allowed", "allowed", ""),
        ),
    ],
)
def test_the_log_names_a_budget_only_for_the_gateways_own_429(
    line: dict[str, Any], expected: tuple[str, str, str]
) -> None:
    e = events.parse_line(json.dumps(line))
    assert e is not None
    assert (e.event, e.reason, e.budget) == expected
