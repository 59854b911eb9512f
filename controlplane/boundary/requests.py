"""Permission requests an agent files at the boundary, judged by the control plane. Pure.

A refused agent posts ``{destination, methods, paths, reason}`` to ``http://avm.boundary/requests``
on its own listener; the gateway forwards it, with the listener's identity in a header the agent
cannot set, to the request recorder (``hostscripts/request_recorder.py``, its own user), which
stores the body as it came. Nothing about a stored request is trusted: ``judge`` validates a
stored record (written by the recorder's user, a known identity, a body that is exactly one
request) and turns it into a ``Judged`` request, valid or invalid with the reason, never an
exception: a hostile agent's body is shown, not crashed on.

A valid request is a ``NameRule`` without a credential (an agent cannot ask for one); ``grant``
merges it into the profile's policy (the methods and paths added to its ``host:port`` entry,
or a new entry), and ``change_digest`` binds an approval to exactly that change: the target, the
request id, the profile, and the policy generations before and after.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from pydantic import Field, ValidationError

from controlplane._internal.loading import Frozen
from controlplane.boundary.policy import EgressPolicy, Method, NameRule
from controlplane.canonical import canonical_bytes, domain_digest
from controlplane.errors import UsageError

RESERVED = "avm.boundary"  # the name only the gateway answers, on each profile's own listener
PORT = 80  # plain HTTP on the listener's address: the agent needs no CA to ask
ASK = f"POST http://{RESERVED}/requests"
READ = f"GET http://{RESERVED}/policy"
RECORDER_USER = "avm-requests"
IDENTITY_HEADER = "x-avm-identity"  # set (overwritten) by the gateway from the listener
MAX_BODY = 8192
MAX_REASON = 500
REQUEST_TTL_S = 7 * 86400  # a request nobody decided on expires
_ID_RE = re.compile(r"^rq-[0-9a-f]{16}$")
_DEST_RE = re.compile(r"^([^:\s]{1,253})(?::([0-9]{1,5}))?$")
STATES = ("invalid", "pending", "approved", "denied", "expired", "applied")


class AskBody(Frozen):
    """What an agent posts: one destination, the methods and paths it wants, and why."""

    destination: str = Field(min_length=1, max_length=260)
    methods: tuple[Method, ...] = Field(min_length=1, max_length=7)
    paths: tuple[str, ...] = Field(min_length=1, max_length=16)
    reason: str = Field(min_length=1, max_length=MAX_REASON)


class Judged(Frozen):
    """One stored request after validation. ``rule`` is None exactly when ``error`` is set."""

    id: str
    profile: str | None = None
    received: str | None = None
    state: str = "pending"
    error: str | None = None
    reason: str | None = None
    rule: NameRule | None = None


def is_request_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value))


def request_id_error(value: str) -> UsageError:
    return UsageError(
        "request-id-invalid",
        f"{value!r} is not a request id",
        hint="request ids look like rq-0123456789abcdef: `avm egress requests --target VM` lists them",
        details={"expected": _ID_RE.pattern, "actual": value},
    )


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        return f"{where}: {err['msg']}"
    if isinstance(exc, UsageError):
        return exc.message
    return str(exc)


def parse_body(text: str) -> tuple[NameRule, str]:
    """The rule a request body asks for, and its reason. Raises ``ValueError`` (a JSON problem), pydantic's
    ``ValidationError`` or ``UsageError`` (an entry the policy model refuses)."""
    doc = json.loads(text, object_pairs_hook=_no_duplicates)
    body = AskBody.model_validate(doc)
    m = _DEST_RE.fullmatch(body.destination)
    if m is None:
        raise ValueError(f"destination: expected host or host:port, got {body.destination!r}")
    if m.group(1) == RESERVED:
        raise ValueError(f"destination: {RESERVED} is the boundary itself, not a destination")
    port = int(m.group(2) or 443)
    return NameRule(host=m.group(1), port=port, methods=body.methods, paths=body.paths), body.reason


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate key in {sorted(keys)}")
    return dict(pairs)


def judge(record: Any, *, owner: str, profiles: frozenset[str], now: dt.datetime | None = None) -> Judged:
    """One stored record (``{id, identity, received, body}``, as the recorder wrote it, owned by
    ``owner``) judged against the profiles that have a listener. Never raises."""
    rid = str(record.get("id", "")) if isinstance(record, dict) else ""
    if not is_request_id(rid):
        return Judged(id=rid[:40] or "?", state="invalid", error="not a request id")
    if owner != RECORDER_USER:
        return Judged(id=rid, state="invalid", error=f"not written by the recorder (owner {owner})")
    identity = str(record.get("identity", ""))
    profile = identity.removeprefix("profile:") if identity.startswith("profile:") else None
    if profile not in profiles:
        return Judged(id=rid, state="invalid", error=f"identity {identity[:80]!r} is no listener's")
    received = str(record.get("received", ""))
    try:
        when = dt.datetime.fromisoformat(received.replace("Z", "+00:00"))
    except ValueError:
        return Judged(id=rid, profile=profile, state="invalid", error="received: not a time")
    body = record.get("body")
    if not isinstance(body, str) or len(body.encode()) > MAX_BODY:
        return Judged(id=rid, profile=profile, received=received, state="invalid", error="body: too large")
    try:
        rule, reason = parse_body(body)
    except (ValueError, ValidationError, UsageError) as exc:
        error = _first_error(exc)[:300]
        return Judged(id=rid, profile=profile, received=received, state="invalid", error=error)
    now = now or dt.datetime.now(dt.UTC)
    expired = (now - when).total_seconds() > REQUEST_TTL_S
    state = "expired" if expired else "pending"
    return Judged(id=rid, profile=profile, received=received, state=state, reason=reason, rule=rule)


def grant(policy: EgressPolicy, rule: NameRule) -> EgressPolicy:
    """``policy`` with ``rule``'s methods and paths added to its ``host:port`` entry (the
    entry's credential kept), or ``rule`` as a new entry. Idempotent."""
    names = list(policy.names)
    for i, have in enumerate(names):
        if have.key == rule.key:
            methods = have.methods + tuple(m for m in rule.methods if m not in have.methods)
            paths = have.paths + tuple(p for p in rule.paths if p not in have.paths)
            names[i] = have.model_copy(update={"methods": methods, "paths": paths})
            return EgressPolicy(names=tuple(names))
    return EgressPolicy(names=(*names, rule))


def change_digest(target: str, request: str, profile: str, before: str, after: str) -> str:
    """The digest an approval of this request signs: exactly this change of this profile."""
    doc = {"target": target, "request": request, "profile": profile, "from": before, "to": after}
    return domain_digest("egress-request", canonical_bytes(doc))


def policy_view(identity: str, policy: EgressPolicy) -> dict[str, Any]:
    """What ``GET http://avm.boundary/policy`` answers: the caller's own policy (credential
    headers named, never a ref or value) and how to ask for more."""
    names = [
        {
            "host": r.host,
            "port": r.port,
            "methods": list(r.methods),
            "paths": list(r.paths),
            **({"credential_header": r.credential.header} if r.credential else {}),
        }
        for r in policy.names
    ]
    return {
        "identity": identity,
        "policy": policy.generation,
        "names": names,
        "request": ASK,
        "request_body": {
            "destination": "host[:port]",
            "methods": ["GET"],
            "paths": ["/v1/*"],
            "reason": "...",
        },
    }
