"""The release manifest: ``avm.yaml`` at the promoted commit of an agent repo.

Parsed at the edge into frozen models (``extra="forbid"``): an unknown key, a bad profile name,
a secret value where a ``secret://`` reference belongs, or an unpinned artifact is refused before
anything else happens.

Example::

    profiles:
      - name: web
        risk_tier: L1
        canary: true
        entrypoint: [python3, agent.py]
        env: {GATEWAY_PORT: "8081"}
        secrets: {API_TOKEN: secret://vault/web-token}
        tools: [{name: search, schema_sha256: "<sha256 of the tool's canonical MCP descriptor>"}]
        egress: [{host: 127.0.0.1, port: 443}]
        limits: {memory_max: 256M, tasks_max: 64, cpu_quota: 50%}
        health: {port: 8081, path: /healthz, timeout_s: 20}
    artifacts:
      - {path: model/weights.bin, sha256: "..."}
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import Field, GetJsonSchemaHandler, field_validator, model_validator
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import CoreSchema

from controlplane._internal.loading import Frozen, parse_yaml, validate
from controlplane.boundary.policy import EgressPolicy, NameRule, parse_policy
from controlplane.errors import UsageError
from controlplane.governance.secretscan import scan_env
from controlplane.ids import ProfileName, RiskTier, pattern_validator

MANIFEST_PATH = "avm.yaml"
_ENV_KEY = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_SECRET_REF = re.compile(r"^secret://[a-z0-9][a-z0-9-]{0,31}/[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_TOOL = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_SIZE = re.compile(r"^[1-9][0-9]{0,5}[KMG]$")
_PERCENT = re.compile(r"^[1-9][0-9]{0,3}%$")
_REL_PATH = re.compile(r"^(?!/)(?!.*(^|/)\.\.(/|$))[A-Za-z0-9._/-]{1,255}$")
_ENV_VALUE = re.compile(r"^[^\n\r\0]{0,4096}$")


EnvKey = Annotated[str, pattern_validator(_ENV_KEY, "env name (UPPER_SNAKE)")]
SecretRef = Annotated[str, pattern_validator(_SECRET_REF, "secret reference (secret://STORE/NAME)")]
ToolName = Annotated[str, pattern_validator(_TOOL, "tool name")]
RelPath = Annotated[str, pattern_validator(_REL_PATH, "relative path inside the repo")]


class EgressRule(Frozen):
    host: str
    port: int = Field(ge=1, le=65535)
    proto: Literal["tcp", "udp"] = "tcp"

    @field_validator("host")
    @classmethod
    def _ip_or_cidr(cls, value: str) -> str:
        ipaddress.ip_network(value, strict=False)  # systemd's IPAddressAllow takes addresses only
        return value


def _is_name_entry(entry: object) -> bool:
    """An ``egress:`` entry by name (the gateway's) rather than an IP/CIDR rule (nftables')."""
    if not isinstance(entry, dict):
        return False
    if {"methods", "paths", "credential", "mcp"} & entry.keys():
        return True
    try:
        ipaddress.ip_network(str(entry.get("host", "")), strict=False)
    except ValueError:
        return True
    return False


def _mcp_tools(entry: dict[str, Any], tools: object, source: str) -> dict[str, Any]:
    """``mcp: true`` on an entry by name: the profile's ``tools:`` are that server's allowlist at
    the gateway. The tools are written once, in ``tools:``; anything but true/false is refused."""
    if "mcp" not in entry:
        return entry
    flag = entry["mcp"]
    if flag is not True and flag is not False:
        raise UsageError(
            "egress-mcp-invalid",
            f"{source}: {entry.get('host')!s} mcp: expected true or false, got {flag!r}",
            hint="write mcp: true; the profile's tools: (name + schema_sha256) are the allowlist",
            details={"expected": "true | false", "actual": str(flag)},
        )
    rest = {k: v for k, v in entry.items() if k != "mcp"}
    return {**rest, "mcp": {"tools": tools if isinstance(tools, list) else []}} if flag else rest


class McpTool(Frozen):
    """One allowed MCP tool, pinned by the sha256 of its canonical descriptor (name,
    description, inputSchema as RFC 8785 JSON): a tool whose schema changed is a different tool."""

    name: ToolName
    schema_sha256: Annotated[
        str, pattern_validator(re.compile(r"^[0-9a-f]{64}$"), "sha256 hex of the tool schema")
    ]


class Limits(Frozen):
    memory_max: Annotated[str, pattern_validator(_SIZE, "size like 256M")] = "256M"
    tasks_max: int = Field(default=64, ge=1, le=4096)
    cpu_quota: Annotated[str, pattern_validator(_PERCENT, "percentage like 50%")] = "50%"


class Health(Frozen):
    port: int = Field(ge=1024, le=65535)
    path: Annotated[str, pattern_validator(re.compile(r"^/[A-Za-z0-9._/-]{0,127}$"), "URL path")] = "/healthz"
    timeout_s: float = Field(default=20.0, gt=0, le=600)


class Profile(Frozen):
    name: ProfileName
    risk_tier: RiskTier
    canary: bool = False
    entrypoint: list[Annotated[str, pattern_validator(re.compile(r"^[^\0\n]{1,512}$"), "argument")]] = Field(
        min_length=1
    )
    env: dict[EnvKey, Annotated[str, pattern_validator(_ENV_VALUE, "env value")]] = {}
    secrets: dict[EnvKey, SecretRef] = {}
    tools: list[McpTool] = []
    egress: list[EgressRule] = []
    # egress entries by name ({host, port, methods, paths, credential}) from the same `egress:`
    # list, validated by the boundary's one policy model; IP/CIDR entries stay in ``egress``
    egress_names: SkipJsonSchema[EgressPolicy] = EgressPolicy()
    limits: Limits = Limits()
    health: Health

    @classmethod
    def __get_pydantic_json_schema__(cls, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """avm.yaml's ``egress:`` items are IP rules or entries by name (``NameRule``)."""
        schema = handler(core)
        target = handler.resolve_ref_schema(schema)
        by_name = handler.resolve_ref_schema(handler(NameRule.__pydantic_core_schema__))
        # in avm.yaml an MCP server says `mcp: true`: its tools are the profile's `tools:`
        mcp_flag = {"type": "boolean", "description": "the profile's tools: are this server's allowlist"}
        by_name = {**by_name, "properties": {**by_name["properties"], "mcp": mcp_flag}}
        items = target["properties"]["egress"]["items"]
        target["properties"]["egress"]["items"] = {"anyOf": [items, by_name]}
        return schema

    @model_validator(mode="before")
    @classmethod
    def _split_egress(cls, raw: object) -> object:
        if not isinstance(raw, dict):
            return raw
        if "egress_names" in raw:
            raise ValueError("egress_names is not a key of avm.yaml: list names under egress:")
        entries = raw.get("egress")
        if not isinstance(entries, list):
            return raw
        source = f"profile {raw.get('name')!s} egress"
        names = [_mcp_tools(e, raw.get("tools"), source) for e in entries if _is_name_entry(e)]
        return {
            **raw,
            "egress": [e for e in entries if not _is_name_entry(e)],
            "egress_names": parse_policy(names, source=source),
        }

    @property
    def bound_refs(self) -> frozenset[str]:
        """The secret refs the gateway injects for this profile: bound to a destination."""
        return frozenset(r.credential.ref for r in self.egress_names.names if r.credential)

    @field_validator("env")
    @classmethod
    def _no_secret_looking_values(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if any(word in key for word in ("TOKEN", "PASSWORD", "SECRET", "API_KEY", "PRIVATE_KEY")):
                raise ValueError(
                    f"env {key} looks like a secret: declare it under secrets: as secret://STORE/NAME"
                )
        for key, reason in scan_env(env).items():
            # the value itself is never echoed: it may be a live credential
            raise ValueError(
                f"env {key} value looks like a secret ({reason}): put it in a secret store and "
                f"declare it under secrets: as secret://STORE/NAME"
            )
        return env

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[McpTool]) -> list[McpTool]:
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tool names: {sorted({n for n in names if names.count(n) > 1})}")
        return tools


class Artifact(Frozen):
    path: RelPath
    sha256: Annotated[str, pattern_validator(re.compile(r"^[0-9a-f]{64}$"), "sha256 hex")]


class ReleaseManifest(Frozen):
    soak_s: float = Field(default=5.0, ge=0, le=3600)
    profiles: list[Profile] = Field(min_length=1)
    artifacts: list[Artifact] = []

    @field_validator("profiles")
    @classmethod
    def _unique_names(cls, profiles: list[Profile]) -> list[Profile]:
        names = [p.name for p in profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate profile names: {sorted(n for n in names if names.count(n) > 1)}")
        return profiles

    def profile(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        raise UsageError(
            "profile-unknown",
            f"profile {name!r} is not declared in {MANIFEST_PATH}",
            hint=f"declared profiles: {', '.join(p.name for p in self.profiles)}",
            details={"expected": [p.name for p in self.profiles], "actual": name},
        )


def parse_manifest(data: bytes, *, source: str = MANIFEST_PATH) -> ReleaseManifest:
    """Raises ``UsageError("manifest-invalid")`` naming the failing field."""
    raw = parse_yaml(data, code="manifest-invalid", source=source)
    return validate(
        ReleaseManifest,
        raw,
        code="manifest-invalid",
        source=source,
        hint="fix avm.yaml at that commit; docs/release-engineer.md describes every field",
    )
