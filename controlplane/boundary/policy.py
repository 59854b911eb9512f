"""The egress policy by name: which HTTPS destinations an identity may reach, how, and with what.

One frozen, validated model, ``EgressPolicy``, used by job specs (``egress.names``) and, through
``parse_policy``, by anything else that carries ``egress:`` entries by name. An entry names one
host (an exact name, or ``*.`` plus a name: a wildcard of the first label only), a port, the
methods and paths it may use, and at most one credential that the gateway injects; a credential
is part of its entry, so it is bound to that host and port and cannot exist without them. An
entry with ``mcp:`` is an MCP server: POST only, and ``tools`` (name + ``schema_sha256``) are the
only tools it may be called with (``controlplane.boundary.mcprules``, ``mcppin``).
Raw IP/CIDR rules are not entries by name: they stay in ``jobspec.EgressRule``, validated by
``controlplane.jobs.egress.rules`` (one validator each).

Every refusal is a ``UsageError`` (exit 64) with its own code, raised while the model is built,
so an invalid policy never exists inside avm. ``EgressPolicy.generation`` is the sha256 of the
policy's canonical JSON: the value the gateway reports as the generation in force.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from controlplane._internal.loading import Frozen, validate
from controlplane.canonical import canonical_bytes, sha256_digest
from controlplane.errors import UsageError
from controlplane.ids import JsonSchemaExtra, json_pattern

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
# at least two labels, the last not all digits (so "10.0.0.1" is not a name), 253 characters at most
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$)(?:\*\.)?(?:{_LABEL}\.)+(?!\d+$){_LABEL}$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]{1,64}$")  # an RFC 9110 token, lower case
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~!$&'()+,;=:@%/-]{0,255}(?:/\*)?$")
_REF_RE = re.compile(r"^secret://local/[A-Za-z0-9._-]{1,128}$")
TOOL_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")  # an MCP tool name (avm.yaml `tools:` too)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# headers the gateway itself owns: an injected credential may not replace routing or framing
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "cookie",
        "proxy-authorization",
    }
)
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# a destination's trust ceiling, lowest first: what a classifier's verdict is compared against
Sensitivity = Literal["public", "internal", "confidential", "restricted"]
SENSITIVITY_LEVELS: tuple[Sensitivity, ...] = ("public", "internal", "confidential", "restricted")


def _refuse(code: str, what: str, expected: str, actual: object, hint: str) -> UsageError:
    return UsageError(
        code,
        f"egress {what}: expected {expected}, got {actual!r}",
        hint=hint,
        details={"expected": expected, "actual": str(actual)},
    )


def _hostname(value: str) -> str:
    if value == "*" or (value.startswith("*") and not value.startswith("*.")):
        raise _refuse(
            "egress-name-wildcard",
            "host",
            "an exact name or '*.' + a name (a wildcard of the first label only)",
            value,
            "list each name; '*' alone would open every destination",
        )
    if "*" in value[1:]:
        raise _refuse(
            "egress-name-wildcard", "host", "'*' only as the whole first label", value, "use '*.example.com'"
        )
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        pass
    else:
        raise _refuse(
            "egress-name-invalid",
            "host",
            "a DNS name (IP and CIDR rules go in egress.allow)",
            value,
            "put addresses in egress.allow: they are enforced by nftables, not by the gateway",
        )
    if value == "avm.boundary":
        raise _refuse(
            "egress-name-invalid",
            "host",
            "a destination (avm.boundary is the gateway's own name)",
            value,
            "avm.boundary answers GET /policy and POST /requests on every listener already",
        )
    if not _HOSTNAME_RE.fullmatch(value):
        raise _refuse(
            "egress-name-invalid",
            "host",
            "a lower-case DNS name of two labels or more (a-z 0-9 '-', 63 per label)",
            value,
            "names are matched exactly against the TLS server name and the Host header",
        )
    return value


def _path(value: str) -> str:
    if not value.startswith("/"):
        raise _refuse(
            "egress-path-invalid", "path", "a path starting with '/'", value, "write '/v1/messages'"
        )
    if not _PATH_RE.fullmatch(value) or "/../" in value + "/" or "/./" in value + "/" or "//" in value:
        raise _refuse(
            "egress-path-invalid",
            "path",
            "a normalised path (no '..', '.', '//', '?', '#'), optionally ending in '/*' for a prefix",
            value,
            "the gateway normalises request paths before matching; list them in that form",
        )
    return value


def _header(value: str) -> str:
    if not _TOKEN_RE.fullmatch(value) or value in _RESERVED_HEADERS:
        raise _refuse(
            "egress-credential-header-invalid",
            "credential.header",
            "a lower-case HTTP header token that is not a framing or routing header",
            value,
            "e.g. 'x-api-key' or 'authorization'",
        )
    return value


def _ref(value: str) -> str:
    if not _REF_RE.fullmatch(value):
        raise _refuse(
            "egress-credential-ref-invalid",
            "credential.ref",
            "secret://local/NAME (NAME: 1-128 of A-Z a-z 0-9 . _ -)",
            value,
            "store the value with `avm secrets put secret://local/NAME`",
        )
    return value


class Credential(Frozen):
    """A credential the gateway injects (replacing any header of that name the agent sent)."""

    header: Annotated[
        str, AfterValidator(_header), JsonSchemaExtra({"pattern": json_pattern(_TOKEN_RE.pattern)})
    ]
    ref: Annotated[str, AfterValidator(_ref), JsonSchemaExtra({"pattern": json_pattern(_REF_RE.pattern)})]
    format: Literal["{value}", "Bearer {value}"] = "{value}"


def _tool_name(value: str) -> str:
    if not TOOL_RE.fullmatch(value):
        raise _refuse("egress-mcp-invalid", "mcp tool name", TOOL_RE.pattern, value, "e.g. 'search'")
    return value


def _sha256_hex(value: str) -> str:
    if not _SHA256_RE.fullmatch(value):
        raise _refuse(
            "egress-mcp-invalid",
            "mcp tool schema_sha256",
            "64 lower-case hex digits",
            value,
            "the sha256 of the tool's canonical descriptor (controlplane.boundary.mcptools.schema_sha256)",
        )
    return value


class McpTool(Frozen):
    """One tool an MCP server may be called with, pinned by the sha256 of its descriptor."""

    name: Annotated[
        str, AfterValidator(_tool_name), JsonSchemaExtra({"pattern": json_pattern(TOOL_RE.pattern)})
    ]
    schema_sha256: Annotated[str, AfterValidator(_sha256_hex)]


class McpServer(Frozen):
    """The destination is an MCP server (Streamable HTTP, JSON-RPC in POST bodies): the gateway
    parses every request and lets ``tools/call`` through only for a listed tool."""

    tools: tuple[McpTool, ...] = ()


class Budget(Frozen):
    """What one identity may spend on one destination, enforced by the gateway (429 once spent).

    ``requests_per_minute``: a token bucket of that many requests, refilled in full every minute
    (Envoy's ``local_ratelimit`` in the destination's chain, before any credential is injected).
    ``request_bytes_per_minute``: the same for request body bytes (what the agent sends out);
    each request is buffered whole by the gateway (so a chunked body is counted too), and a
    single body larger than the budget (or than 16 MiB) is refused. Response bytes are counted
    in usage, not budgeted (``controlplane.boundary.budget``).
    """

    requests_per_minute: int | None = Field(default=None, ge=1, le=100_000)
    request_bytes_per_minute: int | None = Field(default=None, ge=1, le=(1 << 32) - 1)  # Envoy: uint32

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.requests_per_minute is None and self.request_bytes_per_minute is None:
            raise _refuse(
                "egress-policy-invalid",
                "budget",
                "requests_per_minute, request_bytes_per_minute or both",
                "{}",
                "an empty budget limits nothing: remove it or set a limit",
            )
        return self


class NameRule(Frozen):
    """One allowed HTTPS destination by name. Paths end in ``/*`` for a prefix, else are exact."""

    host: Annotated[
        str, AfterValidator(_hostname), JsonSchemaExtra({"pattern": json_pattern(_HOSTNAME_RE.pattern)})
    ]
    port: int = Field(default=443, ge=1, le=65535)
    methods: tuple[Method, ...] = Field(min_length=1)
    paths: tuple[Annotated[str, AfterValidator(_path)], ...] = Field(min_length=1)
    credential: Credential | None = None
    # the content classifier (controlplane.boundary.classify): ``inspect`` holds each request for
    # a verdict over its body; a verdict above ``max_sensitivity`` is refused at the gateway
    max_sensitivity: Sensitivity = "restricted"
    inspect: Annotated[bool, Field(strict=True)] = False
    mcp: McpServer | None = None  # an MCP server: its tools/call allowlist (boundary.mcprules)
    budget: Budget | None = None  # what this identity may spend here (boundary.budget)

    @model_validator(mode="after")
    def _ceiling_needs_inspection(self) -> NameRule:
        if self.max_sensitivity != "restricted" and not self.inspect:
            raise _refuse(
                "egress-ceiling-uninspected",
                f"{self.key} max_sensitivity",
                "inspect: true for a ceiling below restricted (only an inspected body has a verdict)",
                f"max_sensitivity: {self.max_sensitivity}, inspect: false",
                "add `inspect: true`, or drop max_sensitivity: a ceiling nothing checks is not one",
            )
        return self

    @property
    def allowed_sensitivities(self) -> tuple[Sensitivity, ...]:
        """The verdicts the ceiling lets through, lowest first."""
        return SENSITIVITY_LEVELS[: SENSITIVITY_LEVELS.index(self.max_sensitivity) + 1]

    @model_validator(mode="after")
    def _mcp_posts(self) -> NameRule:
        if self.mcp is None:
            return self
        if self.methods != ("POST",):
            raise _refuse(
                "egress-mcp-invalid",
                f"{self.key} methods",
                "['POST'] for an MCP server (every message is a JSON-RPC body in a POST)",
                list(self.methods),
                "write methods: [POST]; server-sent GET streams are not passed by the gateway",
            )
        names = [t.name for t in self.mcp.tools]
        if len(set(names)) != len(names):
            raise _refuse(
                "egress-mcp-invalid",
                f"{self.key} mcp tools",
                "each tool listed once",
                names,
                "remove the repeat",
            )
        return self

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    @property
    def key(self) -> str:
        """``host:port``: the destination a credential is bound to."""
        return f"{self.host}:{self.port}"


class EgressPolicy(Frozen):
    """The names an identity (a profile or a job) may reach through the gateway; nothing else."""

    names: tuple[NameRule, ...] = ()
    # a run-wide request budget (jobs): requests through the gateway over the whole listener's
    # life, across every destination; None: no run-wide limit
    run_requests: int | None = Field(default=None, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _unique(self) -> EgressPolicy:
        seen: set[str] = set()
        for rule in self.names:
            for what, items in (("methods", rule.methods), ("paths", rule.paths)):
                if len(set(items)) != len(items):
                    raise _refuse(
                        "egress-name-duplicate",
                        f"{rule.key} {what}",
                        "each listed once",
                        list(items),
                        "remove the repeat",
                    )
            if rule.key in seen:
                raise _refuse(
                    "egress-name-duplicate",
                    "names",
                    "each host:port listed once",
                    rule.key,
                    "merge the two entries: one entry holds all methods and paths of a destination",
                )
            seen.add(rule.key)
        wildcard = [r.key for r in self.names if r.wildcard]
        if self.run_requests is not None and wildcard:
            raise _refuse(
                "egress-budget-wildcard",
                "run-wide budget",
                "exact names only (a run-wide budget routes every request through one counting hop, "
                "which resolves exact names only)",
                wildcard,
                "list the names the job needs instead of a wildcard, or drop the run-wide budget",
            )
        return self

    @property
    def generation(self) -> str:
        """``sha256:<hex>`` of the policy's canonical JSON (RFC 8785). Fields added after the
        first release are left out while at their defaults (no budget, no MCP server, no
        inspection, the ``restricted`` ceiling), so a policy that uses none of them keeps the
        generation it had before they existed: a gateway in force is not reported as drifted."""
        doc = self.model_dump(mode="json")
        if doc["run_requests"] is None:
            del doc["run_requests"]
        later = {"budget": None, "mcp": None, "inspect": False, "max_sensitivity": "restricted"}
        for rule in doc["names"]:
            for key, default in later.items():
                if rule[key] == default:
                    del rule[key]
        return sha256_digest(canonical_bytes(doc))

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(sorted({r.port for r in self.names}))


def parse_policy(raw: Any, *, source: str = "<input>") -> EgressPolicy:
    """Validate ``egress:`` entries by name: a list of entries, or a mapping ``{names: [...]}``.

    Raises ``UsageError`` with the ``egress-*`` code of the entry that is refused, or
    ``egress-policy-invalid`` naming the first bad field (unknown keys, a missing method list).
    """
    doc = {"names": raw} if isinstance(raw, list) else raw
    return validate(
        EgressPolicy,
        doc,
        code="egress-policy-invalid",
        source=source,
        hint="an entry is {host, port, methods, paths, credential: {header, ref, format}, "
        "max_sensitivity: public|internal|confidential|restricted, inspect: true|false, "
        "mcp: {tools: [{name, schema_sha256}]}, budget: {requests_per_minute, request_bytes_per_minute}}; "
        "unknown keys are refused",
    )
