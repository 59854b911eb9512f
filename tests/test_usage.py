"""Usage as avm reports it: ``--since`` parsing, the rows and totals, and refusals (exit 64)."""

from __future__ import annotations

import datetime
import json

import pytest

from controlplane.boundary import events, usage
from controlplane.errors import UsageError
from controlplane.home import Home
from tests.plugins.vms import run_avm_json

NOW = datetime.datetime(2026, 12, 2, 5, 3, 56, 123456, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("value", "stamp"),
    [
        ("90s", "2026-12-02T05:02:26.123Z"),
        ("30m", "2026-12-02T04:33:56.123Z"),
        ("2h", "2026-12-02T03:03:56.123Z"),
        ("1d", "2026-12-01T05:03:56.123Z"),
        ("2026-12-01T09:00:00Z", "2026-12-01T09:00:00.000Z"),
        ("2026-12-01T09:00:00", "2026-12-01T09:00:00.000Z"),  # naive: UTC
        ("2026-12-01T10:00:00+01:00", "2026-12-01T09:00:00.000Z"),
    ],
)
def test_since_is_the_logs_own_time_format(value: str, stamp: str) -> None:
    assert usage.since_stamp(value, NOW) == stamp


@pytest.mark.parametrize("value", ["yesterday", "5 m", "-3h", "2026-13-01", "1w"])
def test_a_bad_since_is_refused(value: str) -> None:
    with pytest.raises(UsageError) as err:
        usage.since_stamp(value, NOW)
    assert (err.value.code, err.value.exit_code) == ("usage-since-invalid", 64)


def test_avm_usage_refuses_a_bad_since_before_anything_else(home: Home) -> None:
    rc, doc = run_avm_json(home, "usage", "--target", "nowhere", "--since", "yesterday")
    assert rc == 64
    assert doc["error"]["code"] == "usage-since-invalid"


def _line(**fields: object) -> str:
    base = {"identity": "profile:a", "host": "api.example.test", "method": "POST", "path": "/v1/x"}
    return json.dumps({**base, "code": 200, "reason": "allowed", "t": "2026-12-02T05:00:00.000Z", **fields})


def test_rows_sum_per_identity_and_destination() -> None:
    lines = [
        _line(bytes_sent=10, bytes_received=100, input_tokens=3, output_tokens=4),
        _line(
            bytes_sent=5,
            bytes_received=50,
            input_tokens=None,
            output_tokens=None,
            t="2026-12-02T05:00:01.000Z",
        ),
        _line(code=403, reason="path-not-allowed", bytes_received=90),
        _line(code=429, budget="requests_per_minute", bytes_received=120),
        _line(identity="profile:b", bytes_sent=1, bytes_received=2, input_tokens=7, output_tokens=8),
    ]
    doc = usage.report([e for e in map(events.parse_line, lines) if e])
    keys = ["identity", "requests", "allowed", "denied", "denied_by", "bytes_sent", "bytes_received"]
    keys += ["input_tokens", "output_tokens", "first", "last"]
    assert [tuple(r[k] for k in keys) for r in doc["rows"]] == [
        (
            "profile:a",
            4,
            2,
            2,
            {"budget-exhausted": 1, "path-not-allowed": 1},
            15,
            360,
            3,
            4,
            "2026-12-02T05:00:00.000Z",
            "2026-12-02T05:00:01.000Z",
        ),
        ("profile:b", 1, 1, 0, {}, 1, 2, 7, 8, "2026-12-02T05:00:00.000Z", "2026-12-02T05:00:00.000Z"),
    ]
    assert doc["totals"] == {
        "requests": 5,
        "allowed": 3,
        "denied": 2,
        "bytes_sent": 16,
        "bytes_received": 362,
        "input_tokens": 10,
        "output_tokens": 12,
    }
    text = usage.table(doc["rows"]).splitlines()
    assert text[0].split() == [
        "IDENTITY",
        "DESTINATION",
        "REQ",
        "DENIED",
        "SENT",
        "RECEIVED",
        "IN_TOK",
        "OUT_TOK",
    ]
    assert text[1].split()[:4] == ["profile:a", "api.example.test", "4", "2"]
