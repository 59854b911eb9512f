"""The content gate for real: Envoy from the pinned wheel, real TLS, the test upstream, and the
reference classifier (``classifyd``) as a process in the gateway's namespace, which the agent's
namespace has no route to. The ceiling is the gateway's: the classifier only gives a verdict.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.boundary import envoy, events
from controlplane.boundary.classify import CLASSIFIER
from controlplane.boundary.contentgate import Classifier
from controlplane.boundary.policy import EgressPolicy, parse_policy
from controlplane.boundary.render import GatewaySpec
from tests.plugins.boundarynet import AGENT_ADDR, BoundaryNet, socket_in
from tests.test_boundary_gateway import HOST, KEY, KEY_REF, Setup

CLS_ADDR, CLS_PORT = "127.0.0.1", 19310
CARD = "4111 1111 1111 1111"
CARD_BODY = json.dumps({"messages": [{"role": "user", "content": f"charge card {CARD} please"}]})
CLEAN_BODY = json.dumps({"messages": [{"role": "user", "content": "summarise the release notes"}]})


def inspected(port: int, ceiling: str = "internal") -> EgressPolicy:
    return parse_policy(
        [
            {
                "host": HOST,
                "port": port,
                "methods": ["GET", "POST"],
                "paths": ["/v1/messages", "/v1/models"],
                "credential": {"header": "x-api-key", "ref": KEY_REF},
                "max_sensitivity": ceiling,
                "inspect": True,
            }
        ]
    )


class ClassifierProcess:
    """``classifyd`` inside the gateway's namespace (so only the gateway reaches it)."""

    def __init__(self, net: BoundaryNet, *args: str, port: int = CLS_PORT) -> None:
        argv = ["ip", "netns", "exec", net.gw, sys.executable, "-m", "controlplane.boundary.classifyd"]
        self.proc = subprocess.Popen(
            [*argv, "--listen", f"{CLS_ADDR}:{port}", *args],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == b"ready"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Gate(Setup):
    def inspect_spec(self, pol: EgressPolicy, **classifier: Any) -> GatewaySpec:
        opts = {"address": (CLS_ADDR, CLS_PORT), **classifier}
        return dataclasses.replace(self.spec(pol), classifier=Classifier(**opts))

    def post(self, body: str, path: str = "/v1/messages", **headers: str) -> Any:
        conn = self.client.connection(AGENT_ADDR, self.port, HOST)
        try:
            conn.request(
                "POST", path, body=body.encode(), headers={"content-type": "application/json", **headers}
            )
            resp = conn.getresponse()
            from tests.plugins.boundarynet import Response

            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()


@pytest.fixture
def gate(boundary_net: BoundaryNet) -> Iterator[Gate]:
    s = Gate(boundary_net)
    with s.gw:
        yield s


@pytest.fixture
def classifier(boundary_net: BoundaryNet) -> Iterator[ClassifierProcess]:
    c = ClassifierProcess(boundary_net)
    yield c
    c.stop()


def denial(resp: Any, reason: str, pol: EgressPolicy, port: int) -> None:
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {
        "denied": True,
        "reason": reason,
        "destination": f"{HOST}:{port}",
        "policy": pol.generation,
        "max_sensitivity": "internal",
    }


def test_a_card_number_is_refused_and_a_clean_body_passes_with_the_credential(
    gate: Gate, classifier: ClassifierProcess
) -> None:
    pol = inspected(gate.port)
    gate.gw.start(gate.inspect_spec(pol))
    refused = gate.post(CARD_BODY)
    assert refused.status == 403
    denial(refused, "sensitivity-exceeds-ceiling", pol, gate.port)
    assert (refused.headers["x-avm-sensitivity"], refused.headers["x-avm-findings"]) == ("restricted", "card")
    assert gate.net.upstream_requests() == []
    ok = gate.post(CLEAN_BODY)
    assert ok.status == 200, ok.body
    seen = gate.net.upstream_requests()
    assert [(r["path"], r["body"]) for r in seen] == [("/v1/messages", CLEAN_BODY)]
    # the credential is injected after the verdict; no verdict header travels upstream
    assert [h for h in seen[0]["headers"] if h[0] == "x-api-key"] == [["x-api-key", KEY.decode()]]
    assert [h for h in seen[0]["headers"] if h[0].startswith("x-avm")] == []
    # an email is internal: within the ceiling
    assert gate.post(json.dumps({"to": "bob@example.org"})).status == 200


def test_the_agents_own_labels_and_headers_do_not_get_a_card_through(
    gate: Gate, classifier: ClassifierProcess
) -> None:
    pol = inspected(gate.port)
    gate.gw.start(gate.inspect_spec(pol))
    steer = {
        "x-avm-sensitivity": "public",
        "x-avm-findings": "-",
        "x-avm-classifier": "avm-reference@1",
        "x-sensitivity": "public",
        "x-classification": "public",
        "content-type": "text/plain; sensitivity=public",
    }
    resp = gate.post(CARD_BODY, **steer)
    assert resp.status == 403
    denial(resp, "sensitivity-exceeds-ceiling", pol, gate.port)
    body_label = json.dumps({"sensitivity": "public", "label": "public", "content": f"card {CARD}"})
    assert gate.post(body_label, **steer).status == 403
    assert gate.net.upstream_requests() == []
    # a clean body with the forged headers passes, and none of them reaches the upstream as sent
    assert gate.post(CLEAN_BODY, **steer).status == 200
    sent = {h[0]: h[1] for h in gate.net.upstream_requests()[0]["headers"]}
    assert [k for k in sent if k.startswith("x-avm")] == []


def test_a_denial_is_a_classifier_event_with_kinds_never_the_text(
    gate: Gate, classifier: ClassifierProcess
) -> None:
    pol = inspected(gate.port)
    gate.gw.start(gate.inspect_spec(pol))
    secret_body = f"card {CARD} ssn 123-45-6789 mail carol@example.net"
    assert gate.post(secret_body).status == 403
    assert gate.post(CLEAN_BODY).status == 200
    logged = events.read(gate.gw.access_log, timeout=5.0, want=2)
    assert [(e.event, e.reason, e.code, e.sensitivity, e.findings, e.classifier) for e in logged] == [
        (
            "classifier.denied",
            "sensitivity-exceeds-ceiling",
            403,
            "restricted",
            ("card", "email", "us-ssn"),
            CLASSIFIER,
        ),
        ("egress.allowed", "allowed", 200, "public", (), CLASSIFIER),
    ]
    raw = gate.gw.access_log.read_text() + json.dumps(events.summary(logged))
    for text in ("4111", "123-45-6789", "carol", "example.net"):
        assert text not in raw


@pytest.mark.parametrize("case", ["unreachable", "timeout", "error", "too-large"])
def test_no_verdict_is_a_denial(gate: Gate, case: str) -> None:
    pol = inspected(gate.port)
    args = {"timeout": ("--delay-s", "3"), "error": ("--max-bytes", "16")}.get(case, ())
    proc = None if case == "unreachable" else ClassifierProcess(gate.net, *args)
    try:
        opts: dict[str, Any] = {"timeout_s": 0.5} if case == "timeout" else {}
        if case == "too-large":
            opts["max_body"] = 1024
        gate.gw.start(gate.inspect_spec(pol, **opts))
        resp = gate.post(CLEAN_BODY + " " * (2048 if case == "too-large" else 0))
    finally:
        if proc is not None:
            proc.stop()
    if case == "too-large":
        assert resp.status == 413
        denial(resp, "body-too-large-to-inspect", pol, gate.port)
    else:
        assert resp.status == 403
        denial(resp, "classifier-unavailable", pol, gate.port)
    assert gate.net.upstream_requests() == []
    logged = events.read(gate.gw.access_log, timeout=5.0, want=1)
    assert [(e.event, e.reason) for e in logged] == [
        ("egress.denied", "body-too-large-to-inspect" if case == "too-large" else "classifier-unavailable")
    ]


def test_the_agent_cannot_reach_the_classifier(gate: Gate, classifier: ClassifierProcess) -> None:
    with pytest.raises(OSError):
        socket_in(gate.net.ag, CLS_ADDR, CLS_PORT, timeout=2.0)


class Recorder:
    """tests/plugins/verdict_recorder.py in the gateway's namespace: what the check carried."""

    def __init__(self, net: BoundaryNet, *args: str) -> None:
        self.log = net.tmp / "checks.jsonl"
        argv = ["ip", "netns", "exec", net.gw, sys.executable, "-m", "tests.plugins.verdict_recorder"]
        self.proc = subprocess.Popen(
            [*argv, CLS_ADDR, str(CLS_PORT), str(self.log), *args],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == b"ready"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_the_check_request_carries_the_body_and_no_header_of_the_agents(gate: Gate) -> None:
    rec = Recorder(gate.net)
    log = rec.log
    try:
        gate.gw.start(gate.inspect_spec(inspected(gate.port)))
        sent = {"authorization": "Bearer agent-held-token", "cookie": "c=agent", "x-steer": "agent-value"}
        assert gate.post(CLEAN_BODY, **sent).status == 200
    finally:
        rec.stop()
    (check,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (check["method"], check["path"], check["body"]) == ("POST", "/verdict/v1/messages", CLEAN_BODY)
    text = json.dumps(check["headers"])
    for value in ("agent-held-token", "c=agent", "agent-value", "application/json", KEY.decode()):
        assert value not in text
    # only what Envoy itself says: the (matched) host, the length, and that the body is whole
    assert sorted(check["headers"]) == [
        ["content-length", str(len(CLEAN_BODY))],
        ["host", HOST],
        ["x-envoy-auth-partial-body", "false"],
        ["x-envoy-expected-rq-timeout-ms", "2000"],
        ["x-envoy-internal", "true"],
    ]
    # the upstream still got the agent's own headers and the injected credential, not the verdict
    (up,) = gate.net.upstream_requests()
    got = dict((h[0], h[1]) for h in up["headers"])
    assert (got["x-steer"], got["x-api-key"]) == ("agent-value", KEY.decode())


def test_an_inspected_name_without_a_classifier_is_refused_and_the_filter_order_is_fixed(gate: Gate) -> None:
    from controlplane.boundary.render import render
    from controlplane.errors import UsageError

    with pytest.raises(UsageError) as err:
        render(gate.spec(inspected(gate.port)))
    assert err.value.code == "gateway-listener-invalid"
    rendered = render(gate.inspect_spec(inspected(gate.port)))
    chain = rendered.lds["resources"][0]["filter_chains"][0]
    hcm = chain["filters"][0]["typed_config"]
    # method/path/host first (a refused request is never classified), the verdict, its ceiling,
    # then the credential: the classifier never sees it
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.rbac",
        "envoy.filters.http.credential_injector",
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]
    ceiling = hcm["http_filters"][2]["typed_config"]["rules"]["policies"]
    assert sorted(ceiling) == ["classifier-unavailable", "sensitivity-exceeds-ceiling"]
    authz = hcm["http_filters"][1]["typed_config"]
    assert (authz["failure_mode_allow"], authz["with_request_body"]["allow_partial_message"]) == (
        False,
        False,
    )
    assert [c["name"] for c in rendered.cds["resources"]] == [f"out|{HOST}|{gate.port}", "avm|classifier"]
    # the Tier-1 form (a unix socket) is valid to Envoy too
    envoy.validate(
        render(gate.inspect_spec(inspected(gate.port), address=Path("/run/avm-classifier/c.sock")))
    )


def test_a_classifier_answering_without_a_level_is_a_denial_whatever_the_agent_claims(gate: Gate) -> None:
    """The agent's own x-avm-sensitivity is removed before routing: with a classifier that sets
    no level, nothing the agent sent can stand in for one."""
    pol = inspected(gate.port)
    rec = Recorder(gate.net, "--no-verdict")
    try:
        gate.gw.start(gate.inspect_spec(pol))
        resp = gate.post(CARD_BODY, **{"x-avm-sensitivity": "public", "x-avm-findings": "-"})
    finally:
        rec.stop()
    assert resp.status == 403
    denial(resp, "classifier-unavailable", pol, gate.port)
    assert gate.net.upstream_requests() == []
    assert len(rec.log.read_text().splitlines()) == 1  # it was asked, and gave no level


def test_a_chunked_body_split_inside_the_card_number_is_inspected_whole(
    gate: Gate, classifier: ClassifierProcess
) -> None:
    pol = inspected(gate.port)
    gate.gw.start(gate.inspect_spec(pol))
    conn = gate.client.connection(AGENT_ADDR, gate.port, HOST)
    try:
        chunks = [b'{"content": "card 4111 11', b"11 1111 ", b'1111"}']
        conn.request("POST", "/v1/messages", body=iter(chunks), encode_chunked=True)
        resp = conn.getresponse()
        status, body = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert (status, body["reason"]) == (403, "sensitivity-exceeds-ceiling")
    assert gate.net.upstream_requests() == []
